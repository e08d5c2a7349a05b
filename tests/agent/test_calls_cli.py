"""`chroma-agent calls`: listing, showing, exporting and pruning call records, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import time

import pytest

from agent.calls_cli import parse_when
from agent.cli import main
from records.model import CallEvent, CallInfo
from records.store import open_store
from tests.records.conftest import postgres_server_url, store_url  # noqa: F401 - fixtures shared with the store tests

NOW = time.time()
CALL = "20261206-101500-3fa9c1d2"
EVENTS = [
    ("node", {"name": "greeting", "sensitive": False}),
    ("reply_started", {"turn": 1}),
    ("first_audio", {"turn": 1, "seconds": 0.31}),
    ("agent_reply", {"turn": 1, "text": "Hello, how can I help you today?", "heard_text": "Hello, how can",
                     "interrupted": True, "frames": 30, "heard_frames": 12}),
    ("barge_in", {"turn": 1, "heard_frames": 12, "sent_frames": 30}),
    ("caller_turn_ended", {"audio_seconds": 2.4}),
    ("tool_call", {"id": "t1", "name": "lookup_order", "arguments": {"order": "A17"}}),
    ("tool_result", {"id": "t1", "name": "lookup_order", "result": {"status": "shipped"}, "seconds": 0.12, "error": None}),
    ("tool_result", {"id": "t2", "name": "refund", "result": {"error": "no such order"}, "seconds": 0.05,
                     "error": "no such order"}),
    ("keypad", {"key": "*", "redacted": True}),
    ("transfer_failed", {"to": "+15550123", "reason": "busy"}),
    ("transferred", {"to": "sip:sales@example.com"}),
    ("hold_music", {"track": "jazz"}),
]  # fmt: skip


def fill(url: str) -> None:
    """Three calls: one an hour ago with every kind of event, one 3 days ago, one 40 days ago (a recording)."""
    store = open_store(url)
    started = NOW - 3600
    store.start_call(CallInfo(CALL, "support", "twilio", started, {"call_sid": "CA123"}, caller="+15550100",
                              callee="+15550199", voice="ava", answered_at=started + 0.5))  # fmt: skip
    store.add_events([CallEvent(CALL, i, started + 1 + 1.5 * i, k, d) for i, (k, d) in enumerate(EVENTS)])
    store.end_call(CALL, started + 30, "transferred", "sip:sales@example.com")
    store.start_call(CallInfo("older", "sales", "sip", NOW - 3 * 86_400, caller="alice"))
    store.end_call("older", NOW - 3 * 86_400 + 65, "caller_hung_up")
    store.start_call(CallInfo("ancient", "support", "sip", NOW - 40 * 86_400))
    store.close()


@pytest.fixture
def db(store_url):  # noqa: F811 - the imported fixture, requested by name
    fill(store_url)
    return store_url


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["calls", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def ids_listed(out: str) -> list[str]:
    return [line.split()[-1] for line in out.splitlines()[1:]]


def test_list_shows_calls_newest_first_with_their_facts(db, capsys):
    code, out, _ = run(capsys, "list", "--db", db)
    assert code == 0
    assert ids_listed(out) == [CALL, "older", "ancient"]
    first = out.splitlines()[1]
    for fact in ("support", "twilio", "+15550100 -> +15550199", "transferred", "0:30"):
        assert fact in first
    assert "(not ended)" in out.splitlines()[3]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--since", "2h"], [CALL]),
        (["--since", "7d"], [CALL, "older"]),
        (["--agent", "support"], [CALL, "ancient"]),
        (["--transport", "sip"], ["older", "ancient"]),
        (["--ended-by", "caller_hung_up"], ["older"]),
        (["--limit", "1"], [CALL]),
    ],
)
def test_list_filters(db, capsys, flags, expected):
    code, out, _ = run(capsys, "list", "--db", db, *flags)
    assert code == 0
    assert ids_listed(out) == expected


def test_list_with_nothing_matching_says_so(db, capsys):
    code, out, err = run(capsys, "list", "--db", db, "--agent", "nobody")
    assert (code, out) == (0, "")
    assert "no calls match" in err


def test_show_prints_the_transcript_with_timings_tools_and_events(db, capsys):
    code, out, _ = run(capsys, "show", CALL, "--db", db)
    assert code == 0
    assert "transport  twilio  call_sid=CA123" in out
    assert "answered   +0.50 s" in out
    assert "ended      +30.00 s  transferred: sip:sales@example.com" in out
    lines = out.splitlines()
    said = next(i for i, line in enumerate(lines) if "says" in line)
    assert lines[said].split()[:2] == ["+5.50", "agent"]
    assert '"Hello, how can I help you today?"' in lines[said]
    assert 'caller heard "Hello, how can" (12 of 30 frames)' in lines[said + 1]
    assert 'lookup_order({"order": "A17"})' in out
    assert 'lookup_order -> {"status": "shipped"} in 0.12 s' in out
    assert "refund failed in 0.05 s: \"no such order\"" in out
    assert "stops speaking (2.40 s)" in out
    assert "presses * (redacted)" in out
    assert "transfer to +15550123 failed: busy" in out
    assert "transfers the call to sip:sales@example.com" in out
    assert 'hold_music {"track": "jazz"}' in " ".join(out.split())  # a kind not known to the viewer


def test_show_an_unknown_call_is_a_clear_error(db, capsys):
    code, out, err = run(capsys, "show", "nope", "--db", db)
    assert code == 2
    assert "no call 'nope' in" in err and "calls list" in err


def test_export_one_call_as_jsonl_holds_every_event(db, capsys):
    code, out, _ = run(capsys, "export", CALL, "--db", db)
    assert code == 0
    [line] = out.splitlines()
    record = json.loads(line)
    assert record["call"]["call_id"] == CALL and record["call"]["end_reason"] == "transferred"
    assert record["call"]["transport_ids"] == {"call_sid": "CA123"}
    assert [(e["kind"], e["data"]) for e in record["events"]] == [(k, d) for k, d in EVENTS]


def test_export_since_as_csv_has_a_row_per_event(db, capsys, tmp_path):
    target = tmp_path / "calls.csv"
    code, _, err = run(capsys, "export", "--since", "7d", "--format", "csv", "--output", str(target), "--db", db)
    assert code == 0 and "exported 2 calls" in err
    rows = list(csv.DictReader(io.StringIO(target.read_text(encoding="utf-8"))))
    assert [r["call_id"] for r in rows] == ["older"] + [CALL] * len(EVENTS)  # oldest first; "older" has no events
    assert rows[0]["seq"] == "" and rows[0]["end_reason"] == "caller_hung_up"
    assert [r["kind"] for r in rows[1:]] == [k for k, _ in EVENTS]
    assert rows[1]["offset_s"] == "1.000"
    assert json.loads(rows[7]["data"]) == EVENTS[6][1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["export"], "expected a call ID or --since"),
        (["export", CALL, "--since", "2h"], "not both"),
        (["list", "--since", "last tuesday"], "--since is 'last tuesday', expected a date"),
        (["list", "--limit", "0"], "--limit is 0"),
        (["prune", "--older-than", "0"], "--older-than is 0"),
    ],
)
def test_bad_arguments_are_clear_errors(db, capsys, argv, message):
    code, _, err = run(capsys, *argv, "--db", db)
    assert code == 2
    assert message in err


def test_prune_deletes_old_calls_and_their_recordings(tmp_path, capsys):
    path = str(tmp_path / "calls.db")
    fill(path)
    recording = tmp_path / "ancient.wav"
    recording.write_bytes(b"RIFF")
    kept = tmp_path / "older.wav"
    kept.write_bytes(b"RIFF")
    store = open_store(path)
    store.update_call("ancient", recording=str(recording))
    store.update_call("older", recording=str(kept))
    store.close()

    code, out, _ = run(capsys, "prune", "--older-than", "30", "--db", path)
    assert code == 0
    assert "deleted 1 call started more than 30 days ago, and 1 recording" in out
    assert not recording.exists() and kept.exists()
    _, out, _ = run(capsys, "list", "--db", path)
    assert ids_listed(out) == [CALL, "older"]


def test_a_missing_database_is_an_error_and_is_not_created(tmp_path, capsys):
    missing = tmp_path / "nothing.db"
    code, _, err = run(capsys, "list", "--db", str(missing))
    assert code == 2
    assert f"{missing}: no call records database here" in err
    assert not missing.exists()


def test_a_file_that_is_not_a_database_is_an_error(tmp_path, capsys):
    bogus = tmp_path / "calls.db"
    bogus.write_text("hello " * 500)
    code, _, err = run(capsys, "list", "--db", str(bogus))
    assert code == 2
    assert "not a usable call records database" in err


def test_no_database_given_is_an_error(monkeypatch, capsys):
    monkeypatch.delenv("CHROMA_AGENTS_DATABASE_URL", raising=False)
    code, _, err = run(capsys, "list")
    assert code == 2
    assert "expected --db" in err and "CHROMA_AGENTS_DATABASE_URL" in err


def test_the_environment_names_the_database(tmp_path, monkeypatch, capsys):
    path = str(tmp_path / "env.db")
    fill(path)
    monkeypatch.setenv("CHROMA_AGENTS_DATABASE_URL", path)
    code, out, _ = run(capsys, "list")
    assert code == 0 and ids_listed(out)[0] == CALL


def test_an_agent_file_stands_for_its_records_database(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CHROMA_AGENTS_DATABASE_URL", raising=False)
    (tmp_path / "data").mkdir()
    fill(str(tmp_path / "data" / "support.db"))
    agent = tmp_path / "agent.yaml"
    agent.write_text("name: support\nvoice: ava\nrecords:\n  database: data/support.db\n")
    code, out, _ = run(capsys, "list", "--db", str(agent))
    assert code == 0 and ids_listed(out)[0] == CALL

    plain = tmp_path / "plain" / "agent.yaml"  # no records section: calls.db beside the file
    plain.parent.mkdir()
    plain.write_text("name: support\nvoice: ava\n")
    fill(str(plain.parent / "calls.db"))
    code, out, _ = run(capsys, "list", "--db", str(plain))
    assert code == 0 and ids_listed(out)[0] == CALL


def test_an_agent_file_with_a_bad_records_section_names_the_field(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CHROMA_AGENTS_DATABASE_URL", raising=False)
    agent = tmp_path / "agent.yaml"
    agent.write_text("name: support\nvoice: ava\nrecords:\n  databse: x.db\n")
    code, _, err = run(capsys, "list", "--db", str(agent))
    assert code == 2
    assert f"{agent}: records.databse" in err
    code, _, err = run(capsys, "list", "--db", str(tmp_path / "missing.yaml"))
    assert code == 2 and "no such agent file" in err


def test_parse_when_takes_ages_and_iso_dates():
    now = 1_800_000_000.0
    assert parse_when("90s", now=now) == now - 90
    assert parse_when("30m", now=now) == now - 1800
    assert parse_when("2h", now=now) == now - 7200
    assert parse_when("7d", now=now) == now - 7 * 86_400
    assert parse_when("1.5d", now=now) == now - 1.5 * 86_400
    assert parse_when("2026-12-01") == dt.datetime(2026, 12, 1).timestamp()  # local midnight
    assert parse_when("2026-12-01T09:30:00+00:00") == dt.datetime(2026, 12, 1, 9, 30, tzinfo=dt.UTC).timestamp()
    with pytest.raises(ValueError, match="expected a date"):
        parse_when("soon")
