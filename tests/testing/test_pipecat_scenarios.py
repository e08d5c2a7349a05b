"""pipecat evals scripted-scenario files, run unchanged by `chroma-agent test`: loaded by pipecat's own
loader (`EvalScenarioFile`) and by ours, their events and text checks evaluated over what a run
recorded, their `eval:` criteria put to pipecat's judge, and whole calls over each line.

The judge is the one stand-in: no judge model can run here, so `judge_stand_in.StandInJudge` answers
pipecat's judge over its real HTTP API (OpenAI-compatible chat completions on 127.0.0.1)."""

import asyncio
import json
import socket
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from pipecat.evals.scenario import EvalScenarioFile

from agent.testing.command import EXIT_FAILED, EXIT_SKIPPED
from agent.testing.events import Check, Event, RunResult
from agent.testing.expect import evaluate
from agent.testing.judging import judge_checks
from agent.testing.pipecat_evals import find_scenario_files, load_scenarios
from agent.testing.report import junit_xml, progress_line, report_dict, summary_table
from agent.testing.runner import ScenarioRunner
from tests.speech import requires_espeak
from tests.testing.judge_stand_in import StandInJudge
from tests.testing.test_runner import requires_baresip, requires_chromium

ROOT = Path(__file__).resolve().parents[2]


def write(folder: Path, text: str, name: str = "evals.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def both(path: Path):
    """The file as pipecat's loader reads it, and as ours does."""
    return EvalScenarioFile.load(path), load_scenarios(path)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the format: the same file through pipecat's loader and ours -------------------------------------


PIPECAT_FILE = """
name: orders
judge: !include judge.yaml
user: {modality: audio, speech: {service: kokoro, voice: af_heart}}   # speech here is always espeak-ng
scenarios:
  - name: greeting
    turns:
      - expect:
          - event: response
            text_contains: "Northwind"
  - name: order
    stop_on_failure: false
    turns:
      - user: "Where is my order?"
        expect:
          - event: user_transcription
            text_contains: "my order"
          - event: function_call
            calls:
              - name: lookup_order
                args: {order_id: A17}
              - check_status
            eval: 'looks up "A17"'
          - event: response
            text_excludes: "lookup_order"
            eval: 'says the order "shipped"'
      - user: ["It is", {pause_ms: 400}, "A seventeen."]
      - dtmf: 0123
        expect:
          - {event: llm_marker, marker: complete}
          - {event: response, absent: true, within_ms: 2000}
      - user: "Stop."
        send_after: {event: bot_started_speaking, delay_ms: 700}
        expect:
          - event: bot_interrupted
"""


def test_a_pipecat_file_loads_in_pipecat_and_here_with_the_same_turns(tmp_path):
    write(tmp_path, "eval:\n  service: ollama\n  model: judge-model\n", "judge.yaml")
    theirs, ours = both(write(tmp_path, PIPECAT_FILE))
    assert [s.name for s in theirs] == ["orders/greeting", "orders/order"]
    assert [s.name for s in ours.scenarios] == ["greeting", "order"] and ours.name == "orders"
    greeting, order = ours.scenarios
    # the included judge block, a default for both scenarios, as pipecat parsed it
    assert greeting.judge == order.judge == theirs.scenarios[0].judge == {"service": "ollama", "model": "judge-model"}
    assert greeting.turns[0].kind == "wait" and theirs.scenarios[0].turns[0].user is None
    assert [t.kind for t in order.turns] == ["user", "user", "dtmf", "user"]
    ask, spelled, keys, stop = order.turns
    call = ask.expect[1]
    assert call.calls == [("lookup_order", {"order_id": "A17"}), ("check_status", None)]
    assert [(c.name, c.args) for c in theirs.scenarios[1].turns[0].expect[1].calls] == call.calls
    assert call.params["eval"] == 'looks up "A17"'
    assert (spelled.text, spelled.parts) == ("It is A seventeen.", ["It is", 400.0, "A seventeen."])
    assert keys.digits == "0123" == theirs.scenarios[1].turns[2].dtmf  # not octal, as in pipecat
    assert keys.expect[1].absent and keys.expect[1].within_ms == 2000
    assert stop.barge_in_after_ms == 700 and stop.barges_in


def test_a_recording_in_any_format_with_its_words_is_an_audio_turn(tmp_path):
    import numpy as np
    import soundfile

    soundfile.write(tmp_path / "ask.flac", (0.3 * np.sin(np.arange(8000) / 8)).astype("float32"), 8000)
    path = write(
        tmp_path,
        """
        name: r
        user: {modality: audio}
        scenarios:
          - name: a
            turns:
              - user: "Where is my order?"
                audio: ask.flac
        """,
    )
    theirs, ours = both(path)
    turn = ours.scenarios[0].turns[0]
    assert (turn.kind, turn.text, turn.wav) == ("audio", "Where is my order?", (tmp_path / "ask.flac").resolve())
    assert theirs.scenarios[0].turns[0].audio == str(turn.wav)


def test_pipecat_s_older_single_scenario_file_loads_and_is_found_in_a_folder(tmp_path):
    path = write(tmp_path, "name: hello\nturns:\n  - user: hi\n    expect:\n      - event: llm_response\n")
    write(tmp_path, "eval: {service: ollama}\n", "judge.yaml")  # a fragment a file would include
    with pytest.warns(DeprecationWarning):
        theirs, ours = both(path)
    assert [s.name for s in ours.scenarios] == ["hello"] and theirs.scenarios[0].name == "hello"
    assert find_scenario_files([tmp_path]) == [path]


def test_a_system_context_replaces_the_agent_s_system_prompt_for_the_run(tmp_path):
    path = write(
        tmp_path,
        """
        name: x
        context:
          - {role: system, content: "You are Bo."}
          - {role: system, content: "Be brief."}
        scenarios:
          - name: a
            turns: [{user: hi}]
          - name: b
            context: [{role: system, content: "You are Al."}]
            turns: [{user: hi}]
        """,
    )
    theirs, ours = both(path)
    assert [s.system_prompt for s in ours.scenarios] == ["You are Bo.\n\nBe brief.", "You are Al."]
    assert theirs.scenarios[1].context == [{"role": "system", "content": "You are Al."}]


def test_a_bad_pipecat_block_is_named_by_file_line_and_field(tmp_path):
    path = write(
        tmp_path,
        """
        name: x
        scenarios:
          - name: a
            judge: {modality: smell}
            context: [{role: user, content: hi}]
            turns:
              - user: hi
                send_after: {event: function_call, delay_ms: 100}
        """,
    )
    with pytest.raises(ValueError) as info:
        load_scenarios(path)
    found = str(info.value).splitlines()
    assert f"{path}:4: scenarios[0].judge: 'judge.modality:' must be 'audio' or 'text', got 'smell'" in found
    assert any(p.startswith(f"{path}:5: scenarios[0].context[0]: 'user' is not allowed") for p in found), found
    assert any(p.startswith(f"{path}:8: scenarios[0].turns[0].send_after.event: 'function_call'") for p in found)


def test_the_example_pipecat_scenarios_load_in_pipecat_and_here():
    path = ROOT / "examples/scenarios/customer_service_pipecat.yaml"
    theirs, ours = both(path)
    assert len(theirs) == len(ours.scenarios) == 2
    assert [[t.kind for t in s.turns] for s in ours.scenarios] == [["wait", "user", "user"], ["wait", "dtmf"]]
    for mine, pipecat_s in zip(ours.scenarios, theirs, strict=True):
        assert [len(t.expect) for t in mine.turns] == [len(t.expect) for t in pipecat_s.turns]


# -- the checks, over recorded events -----------------------------------------------------------------


def recorded() -> list[Event]:
    """A greeting, then a turn in which the agent looks an order up and answers."""
    return [
        Event(0, "caller_wait", 0),
        Event(900, "agent_audio_start", 0),
        Event(2500, "agent_text", 0, {"text": "Hello, this is Ava at Northwind.", "interrupted": False}),
        Event(2600, "agent_audio_end", 0),
        Event(4000, "caller_speech_start", 1, {"text": "Where is my order?"}),
        Event(4100, "vad_start", 1),
        Event(5000, "caller_speech_end", 1, {"text": "Where is my order?"}),
        Event(5400, "vad_stop", 1),
        Event(5600, "tool_call", 1, {"name": "lookup_order", "arguments": {"order_id": "A17", "x": 1}}),
        Event(5700, "agent_audio_start", 1),
        Event(7000, "agent_text", 1, {"text": "It shipped on Monday.", "interrupted": False}),
        Event(7100, "agent_audio_end", 1),
        Event(9000, "call_ended", None, {"by": "caller"}),
    ]


def checks_of(tmp_path, turns: str, judge: str = "") -> tuple:
    path = write(tmp_path, f"name: t\n{judge}scenarios:\n  - name: s\n    turns:\n{textwrap.indent(turns, '      ')}")
    scenario = load_scenarios(path).scenarios[0]
    result = RunResult("s", str(path), "inprocess", 1, recorded())
    return scenario, result


def outcome(checks: list[Check]) -> list[tuple[str, str]]:
    return [(c.name, "skip" if c.skipped else "pass" if c.passed else "fail") for c in checks]


def test_reply_transcription_speaking_and_call_events_check_what_the_run_recorded(tmp_path):
    scenario, result = checks_of(
        tmp_path,
        textwrap.dedent(
            """
            - expect:
                - {event: response, text_contains: "Ava at  Northwind"}
                - {event: llm_response, text_contains: "Southwind"}
                - {event: bot_started_speaking, within_ms: 1000}
            - user: Where is my order?
              expect:
                - {event: user_transcription, text_contains: my order}
                - {event: user_stopped_speaking}
                - {event: function_call, calls: [{name: lookup_order, args: {order_id: A17}}]}
                - {event: function_call, name: lookup_order, args: {order_id: B2}}
                - {event: function_call, calls: [lookup_order, lookup_order]}
                - {event: tts_response, text_contains: shipped, text_excludes: Monday}
                - {event: llm_started, within_ms: 500}
                - {event: bot_stopped_speaking}
                - {event: response, absent: true, within_ms: 1000}
                - {event: bot_interrupted}
                - {event: llm_marker}
            """
        ),
    )
    assert outcome(evaluate(scenario, result)) == [
        ("turn 1: response contains 'Ava at  Northwind'", "pass"),  # spacing ignored, as in pipecat
        ("turn 1: llm_response contains 'Southwind'", "fail"),
        ("turn 1: bot_started_speaking within 1000 ms", "pass"),  # 900 ms after the turn began
        ("turn 2: user_transcription contains 'my order'", "pass"),
        ("turn 2: user_stopped_speaking", "pass"),
        ("turn 2: function_call lookup_order {'order_id': 'A17'}", "pass"),
        ("turn 2: function_call lookup_order {'order_id': 'B2'}", "fail"),
        ("turn 2: function_call lookup_order, lookup_order", "fail"),  # one call cannot match twice
        ("turn 2: tts_response contains 'shipped' excludes 'Monday'", "fail"),
        ("turn 2: llm_started within 500 ms", "fail"),  # its tool call came 600 ms after the caller
        ("turn 2: bot_stopped_speaking", "pass"),
        ("turn 2: no response within 1000 ms", "pass"),  # the reply ended 2000 ms after the caller
        ("turn 2: bot_interrupted", "fail"),
        ("turn 2: llm_marker", "skip"),
        ("no errors during the call", "pass"),
    ]
    details = {c.name: c.detail for c in evaluate(scenario, result)}
    assert "the agent said 'Hello, this is Ava at Northwind.', which does not contain 'Southwind'" in details[
        "turn 1: llm_response contains 'Southwind'"
    ]
    assert "no tool_call lookup_order with arguments {'order_id': 'B2'}" in details[
        "turn 2: function_call lookup_order {'order_id': 'B2'}"
    ]
    assert "speech-to-speech model writes no turn-completion markers" in details["turn 2: llm_marker"]


def test_a_skipped_check_is_neither_pass_nor_fail_in_every_report(tmp_path):
    scenario, result = checks_of(tmp_path, "- expect:\n    - {event: llm_marker}\n")
    result.checks = evaluate(scenario, result)
    assert (result.status, result.passed) == ("skip", False)
    assert progress_line(result).startswith("SKIP  s  run 1  inprocess") and "0 failed, 1 skipped" in progress_line(result)
    table = summary_table([result])
    assert "| s | inprocess | 0/1 (1 skipped) |" in table
    assert "### Skipped checks" in table and "turn 1: llm_marker: not checked:" in table
    assert "### Failed checks" not in table
    suite = ET.fromstring(junit_xml([result]))
    assert (suite.get("skipped"), suite.get("failures")) == ("1", "0")
    assert "llm_marker" in suite.find(".//testcase/skipped").get("message")
    report = report_dict([result], {})
    assert (report["passed"], report["status"], report["summary"][0]["runs_skipped"]) == (False, "skip", 1)
    assert [c["skipped"] for c in report["runs"][0]["checks"]] == [True, False]


# -- eval: criteria, put to pipecat's judge ----------------------------------------------------------


JUDGED = """
- expect:
    - {event: response, eval: 'greets the caller as "Northwind"'}
- user: Where is my order?
  expect:
    - {event: response, eval: 'says the order was "cancelled"'}
    - {event: function_call, name: lookup_order, eval: 'looks up order "A17"'}
"""


def judge_block(endpoint: str) -> str:
    return f"judge:\n  eval: {{service: ollama, model: stand-in, endpoint: '{endpoint}'}}\n"


def test_eval_criteria_are_judged_on_what_the_agent_said_in_context(tmp_path):
    with StandInJudge() as judge:
        scenario, result = checks_of(tmp_path, JUDGED, judge_block(judge.endpoint))
        checks = asyncio.run(judge_checks(scenario, result))
    assert outcome(checks) == [
        ("turn 1: response eval 'greets the caller as \"Northwind\"'", "pass"),
        ("turn 2: response eval 'says the order was \"cancelled\"'", "fail"),
        ("turn 2: function_call eval 'looks up order \"A17\"'", "pass"),
    ]
    # the judge's no comes with the explainer's reason and what the agent said
    assert "stand-in judge: the quoted word is not in what was judged" in checks[1].detail
    assert "It shipped on Monday." in checks[1].detail
    asked = judge.questions()
    assert asked[0][1]["latest_bot_reply"] == "Hello, this is Ava at Northwind."
    # the second reply is judged after the caller's words and the first reply, the tool call left out
    assert asked[1][1]["latest_bot_reply"] == "It shipped on Monday."
    assert [e["speaker"] for e in asked[1][1]["conversation"]] == ["bot", "user"]
    assert asked[1][1]["conversation"][1]["text"] == "Where is my order?"
    assert asked[2][1]["call"] == {"name": "lookup_order", "arguments": {"order_id": "A17", "x": 1}}


def test_without_a_reachable_judge_each_eval_is_skipped_with_the_reason(tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port()}/v1"
    scenario, result = checks_of(tmp_path, JUDGED, judge_block(endpoint))
    checks = asyncio.run(judge_checks(scenario, result))
    assert [c.skipped for c in checks] == [True, True, True] and not any(c.passed for c in checks)
    assert all(f"no judge reachable at {endpoint}" in c.detail for c in checks)


def test_a_judge_that_refuses_the_key_is_skipped_and_one_that_answers_badly_fails(tmp_path):
    with StandInJudge(status=401) as refusing:
        scenario, result = checks_of(tmp_path, JUDGED, judge_block(refusing.endpoint))
        checks = asyncio.run(judge_checks(scenario, result))
    assert [c.skipped for c in checks] == [True, True, True]
    assert "the judge could not be reached (AuthenticationError" in checks[0].detail
    with StandInJudge(garbage=True) as babbling:
        scenario, result = checks_of(tmp_path, JUDGED, judge_block(babbling.endpoint))
        checks = asyncio.run(judge_checks(scenario, result))
    # as in pipecat: a question the judge could not answer is a no, "judge call failed"
    assert [(c.passed, c.skipped) for c in checks] == [(False, False)] * 3
    assert "judge call failed" in checks[0].detail


def test_a_judge_that_cannot_be_set_up_without_its_key_is_skipped(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "my_judges.py").write_text(
        "from pipecat.services.openai.llm import OpenAILLMService\n"
        "def openai(config):\n    return OpenAILLMService(settings=OpenAILLMService.Settings(model='gpt-4o'))\n"
    )
    scenario, result = checks_of(tmp_path, JUDGED, "judge:\n  eval: {factory: my_judges.openai}\n")
    checks = asyncio.run(judge_checks(scenario, result))
    assert [c.skipped for c in checks] == [True, True, True]
    assert "the judge could not be set up" in checks[0].detail and "api_key" in checks[0].detail


# -- whole calls: `chroma-agent test` in-process, and each line --------------------------------------


FLOW = """
tools:
  lookup_order:
    description: Look up an order.
    parameters:
      type: object
      properties: {order_id: {type: string}}
      required: [order_id]
    python: tools:lookup_order
    timeout_secs: 3
    fallback: Sorry.
initial_node: start
nodes:
  start:
    task_messages: [{role: developer, content: Greet the caller and ask for the order number.}]
    functions:
      - name: lookup_order
        transition_to: status
  status:
    task_messages: [{role: developer, content: Say where the order is.}]
"""

SCRIPT = """
from processors.chroma.scripted import Call, Say
turns = [
    ["Hello, this is Ava at Northwind. What is your order number?"],
    [Call("lookup_order", {"order_id": "A17"}), Say(lambda result: f"Your order has {result['status']}.")],
]
"""

SCENARIO = """
name: orders
judge:
  eval: {service: ollama, model: stand-in, endpoint: "%(endpoint)s"}
scenarios:
  - name: order status
    script: script.py:turns
    turns:
      - expect:
          - event: response
            text_contains: Northwind
            eval: 'greets the caller as "Northwind"'
      - user: "Where is my order A17?"
        expect:
          - {event: user_transcription, text_contains: order A17}
          - event: function_call
            calls:
              - name: lookup_order
                args: {order_id: A17}
          - {event: response, text_contains: shipped, eval: 'says the order has "shipped"'}
          - {event: bot_stopped_speaking}
%(extra)s"""

WRONG = """          - {event: response, eval: 'says the order was "cancelled"'}
"""


def write_call(folder: Path, endpoint: str, extra: str = "") -> Path:
    (folder / "tools.py").write_text("def lookup_order(order_id):\n    return {'status': 'shipped'}\n")
    (folder / "flow.yaml").write_text(FLOW)
    (folder / "script.py").write_text(SCRIPT)
    (folder / "agent.yaml").write_text(
        textwrap.dedent(
            f"""
            name: orders agent
            model: tiny
            voice: {ROOT / "examples/voices/demo"}
            flow: flow.yaml
            turn: {{detector: silence, silence_secs: 0.4}}
            response: {{max_seconds: 10}}
            """
        )
    )
    path = folder / "orders.yaml"
    path.write_text(SCENARIO % {"endpoint": endpoint, "extra": extra})
    EvalScenarioFile.load(path)  # pipecat's format, as pipecat reads it
    return path


@requires_espeak
def test_the_command_runs_a_pipecat_file_and_fails_on_the_judge_s_no(tmp_path, capsys):
    from agent.cli import main

    with StandInJudge() as judge:
        path = write_call(tmp_path, judge.endpoint, extra=WRONG)
        report = tmp_path / "report"
        code = main(["test", str(path), "--agent", str(tmp_path / "agent.yaml"), "--report", str(report)])
    out = capsys.readouterr().out
    assert code == EXIT_FAILED, out
    run = json.loads((report / "report.json").read_text())["runs"][0]
    failed = [c["name"] for c in run["checks"] if not c["passed"]]
    assert failed == ["turn 2: response eval 'says the order was \"cancelled\"'"], run["checks"]
    # the judge was shown what the agent spoke: the scripted greeting, through the model's text stream
    assert judge.questions()[0][1]["latest_bot_reply"] == "Hello, this is Ava at Northwind. What is your order number?"
    assert "FAIL  order status  run 1/1  inprocess" in out


@requires_espeak
def test_the_command_exits_3_and_reports_skips_when_no_judge_is_reachable(tmp_path, capsys):
    from agent.cli import main

    path = write_call(tmp_path, f"http://127.0.0.1:{closed_port()}/v1")
    code = main(["test", str(path), "--agent", str(tmp_path / "agent.yaml")])
    out = capsys.readouterr().out
    assert code == EXIT_SKIPPED, out
    assert "SKIP  order status  run 1/1  inprocess" in out and "0 failed, 2 skipped" in out
    assert out.count("not judged: no judge reachable at http://127.0.0.1:") == 2


@requires_espeak
@pytest.mark.parametrize(
    "transport", ["twilio", pytest.param("sip", marks=requires_baresip), pytest.param("webrtc", marks=requires_chromium)]
)
def test_the_same_pipecat_file_passes_over_each_line(tmp_path, transport):
    with StandInJudge() as judge:
        file = load_scenarios(write_call(tmp_path, judge.endpoint))
        runner = ScenarioRunner(agent=tmp_path / "agent.yaml")  # as --agent gives it
        result = asyncio.run(runner.run(file, file.scenarios[0], transport, 1))
    assert result.error is None, result.error
    assert [c.name for c in result.checks if not c.passed] == []
    assert len(result.checks) == 8  # five expectations, two judged, and no errors
