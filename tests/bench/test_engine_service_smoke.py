"""bench.engine_service's smoke run: the smallest settings, asserting that its rows are there and hold
replies (not how fast: speeds are the benchmark's to report)."""

import json

import pytest

from bench import engine_service
from tests.speech import requires_espeak


def test_the_overhead_part_measures_both_ways_for_every_session_count(tmp_path, capsys):
    out = tmp_path / "service.json"
    assert engine_service.main(["--quick", "--only", "overhead", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Through the engine service vs in process" in printed and "| 2 |" in printed
    rows = json.loads(out.read_text())["results"]["overhead"]["rows"]
    assert sorted(rows, key=int) == ["1", "2"]
    for count, row in rows.items():
        assert row["chunks"] == 5 * int(
            count
        )  # 10 frames in 2-frame chunks, every session, through the service
        assert row["ttfa_local_p50"] > 0 and row["ttfa_remote_p50"] > 0
        assert 0 <= row["added_p50"] <= row["added_max"] and row["client_cpu_per_chunk"] > 0


@requires_espeak
def test_the_call_server_part_carries_calls_with_one_and_two_processes(tmp_path, capsys):
    if engine_service._load_tool(None) is None:
        pytest.skip("pipecat_baseline.py (the load generator) is not on this machine")
    out = tmp_path / "service.json"
    assert engine_service.main(["--quick", "--only", "servers", "--calls", "2", "--json", str(out)]) == 0
    assert "Call servers sharing one engine service" in capsys.readouterr().out
    runs = json.loads(out.read_text())["results"]["servers"]["runs"]
    assert [(r["engine"], r["processes"], r["calls"]) for r in runs] == [
        ("in process", 1, 2),
        ("service", 1, 2),
        ("service", 2, 2),
    ]
    for run in runs:
        assert all(s["replies_completed"] > 0 for s in run["servers"])  # replies came through the service


def test_session_counts_must_be_whole_numbers(capsys):
    with pytest.raises(SystemExit) as stop:
        engine_service.parse_args(["--sessions", "1,x"])
    assert stop.value.code == 2 and "--sessions" in capsys.readouterr().err
