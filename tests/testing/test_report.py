import json
import xml.etree.ElementTree as ET

from agent.testing.events import Check, Event, RunResult
from agent.testing.report import progress_line, summary_table, write_report

from .test_expect import conversation


def results() -> list[RunResult]:
    passing = RunResult(
        scenario="order status",
        file="calls.yaml",
        transport="twilio",
        run=1,
        events=conversation(),
        checks=[
            Check("turn 1: bot_started_speaking within 800 ms", True, "first audio after 600 ms", 0, 600, 6)
        ],
        duration_ms=9800,
    )
    failing = RunResult(
        scenario="order status",
        file="calls.yaml",
        transport="twilio",
        run=2,
        events=[*conversation()[:5], Event(2000, "error", 0, {"message": "boom"})],
        checks=[
            Check(
                "turn 1: bot_started_speaking within 800 ms",
                False,
                "first audio after 900 ms; limit 800 ms",
                0,
                900,
                6,
            ),
            Check("call_ended by agent", False, "the call did not end", None, None, 35),
            Check("node_reached wrap_up", True, "entered at 9650 ms"),
        ],
        duration_ms=2000,
    )
    crashed = RunResult(
        scenario="greeting",
        file="other.yaml",
        transport="sip",
        run=1,
        events=[],
        error="RuntimeError: no route",
    )
    return [passing, failing, crashed]


LIMITS = {
    "order status": [
        Check(
            "order status: first_audio_ms p50 <= 800 ms",
            True,
            "p50 600 ms over 5 measurements in 2 runs",
            value_ms=600,
            line=40,
        ),
        Check(
            "order status: first_audio_ms p95 <= 700 ms",
            False,
            "p95 1200 ms over 5 measurements in 2 runs",
            value_ms=1200,
            line=40,
        ),
    ]
}


def test_write_report_writes_every_file(tmp_path):
    paths = write_report(tmp_path / "out", results(), LIMITS)
    assert set(paths) == {
        "json",
        "markdown",
        "junit",
        "timeline:timeline-order-status-run1.png",
        "timeline:timeline-order-status-run2.png",
        "timeline:timeline-greeting-run1.png",
    }
    assert all(p.is_file() and p.parent == tmp_path / "out" for p in paths.values())


def test_report_json_round_trips_through_run_result(tmp_path):
    given = results()
    report = json.loads(write_report(tmp_path, given, LIMITS)["json"].read_text())
    assert report["passed"] is False
    loaded = [RunResult.from_dict(r) for r in report["runs"]]
    assert loaded == given
    assert [r["passed"] for r in report["runs"]] == [True, False, False]
    assert report["runs"][0]["measurements"]["first_audio_ms"] == [600.0, 700.0, 500.0, 1200.0]
    assert [Check.from_dict(c) for c in report["limits"]["order status"]] == LIMITS["order status"]
    order, greeting = report["summary"]
    assert (order["scenario"], order["transport"], order["runs"], order["runs_passed"]) == (
        "order status",
        "twilio",
        2,
        1,
    )
    assert order["first_audio_ms"] == {"p50": 600.0, "p95": 1200.0, "n": 5}
    assert order["barge_in_stop_ms"] == {"p50": 200.0, "p95": 200.0, "n": 1}
    assert order["limits_passed"] is False
    assert greeting["first_audio_ms"] == {"p50": None, "p95": None, "n": 0}


def test_junit_parses_and_counts_failures(tmp_path):
    root = ET.parse(write_report(tmp_path, results(), LIMITS)["junit"]).getroot()
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("5", "2", "1")
    calls, other = root.findall("testsuite")
    assert calls.get("name") == "calls.yaml" and other.get("name") == "other.yaml"
    assert (calls.get("tests"), calls.get("failures"), calls.get("errors")) == ("4", "2", "0")
    cases = {c.get("name"): c for c in calls.findall("testcase")}
    assert list(cases) == [
        "order status [run 1] (twilio)",
        "order status [run 2] (twilio)",
        "order status limit: order status: first_audio_ms p50 <= 800 ms",
        "order status limit: order status: first_audio_ms p95 <= 700 ms",
    ]
    assert cases["order status [run 1] (twilio)"].findall("failure") == []
    failures = cases["order status [run 2] (twilio)"].findall("failure")
    assert [f.get("message") for f in failures] == [
        "turn 1: bot_started_speaking within 800 ms: first audio after 900 ms; limit 800 ms",
        "call_ended by agent: the call did not end",
    ]
    assert "calls.yaml:35" in failures[1].text
    assert (
        len(cases["order status limit: order status: first_audio_ms p95 <= 700 ms"].findall("failure")) == 1
    )
    (crashed,) = other.findall("testcase")
    assert crashed.find("error").get("message") == "RuntimeError: no route"


def test_summary_table_has_a_row_per_scenario_and_lists_failures(tmp_path):
    text = write_report(tmp_path, results(), LIMITS)["markdown"].read_text()
    assert text == summary_table(results(), LIMITS)
    lines = text.splitlines()
    assert lines[0].startswith("| scenario | transport | runs passed | first audio p50 / p95 ms |")
    assert lines[2] == "| order status | twilio | 1/2 | 600 / 1200 | 200 / 200 | 1/2 met |"
    assert lines[3] == "| greeting | sip | 0/1 | - | - | - |"
    assert (
        "- **order status [run 2] (twilio)** turn 1: bot_started_speaking within 800 ms: "
        "first audio after 900 ms; limit 800 ms (calls.yaml:6)"
    ) in lines
    assert "- **greeting [run 1] (sip)**: the run did not complete: RuntimeError: no route" in lines
    assert any(line.startswith("- **order status** limit order status: first_audio_ms p95") for line in lines)
    assert not any("node_reached wrap_up" in line for line in lines)  # passed: not listed


def test_timelines_are_real_pngs(tmp_path):
    paths = write_report(tmp_path, results(), LIMITS)
    for key, path in paths.items():
        if key.startswith("timeline:"):
            data = path.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
            assert len(data) > 10_000
            assert int.from_bytes(data[16:20], "big") == 1200  # 12 inches at 100 dpi


def test_same_scenario_on_two_transports_gets_two_timelines(tmp_path):
    first, *_ = results()
    other = RunResult(**{**vars(first), "transport": "sip"})
    paths = write_report(tmp_path, [first, other])
    assert {k for k in paths if k.startswith("timeline:")} == {
        "timeline:timeline-order-status-run1.png",
        "timeline:timeline-order-status-sip-run1.png",
    }


def test_progress_line():
    passing, failing, crashed = results()
    assert (
        progress_line(passing, runs=2)
        == "PASS  order status  run 1/2  twilio  first audio p50 600 ms  0 failed"
    )
    assert (
        progress_line(failing, runs=2)
        == "FAIL  order status  run 2/2  twilio  first audio p50 600 ms  2 failed"
    )
    assert progress_line(crashed) == (
        "FAIL  greeting  run 1  sip  first audio p50 -  1 failed  (error: RuntimeError: no route)"
    )
