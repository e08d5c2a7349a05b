"""bench.engine's smoke run: the smallest settings, asserting that every row and table is there
(not how fast anything was: speeds are the benchmark's to report)."""

import json

from bench import engine


def test_engine_benchmark_produces_every_row_and_the_concurrency_table(tmp_path, capsys):
    out = tmp_path / "engine.json"
    code = engine.main(["--frames", "6", "--repeats", "1", "--turns", "2", "--turn-frames", "4",
                        "--sessions", "1,2,3", "--concurrent-frames", "6", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "frame step, one session: transformers' modules / lean step" in printed
    assert "| 3 |" in printed and "A caller joining 2 streaming sessions" in printed
    results = json.loads(out.read_text())["results"]
    assert results["step_codes_equal"] is True  # the lean step speaks the same codes
    rows = results["concurrency"]
    assert sorted(rows, key=int) == ["1", "2", "3"]
    for count, row in rows.items():
        assert 0 < row["frames"] <= 6 * int(count)
        assert row["frames_per_s"] > 0 and row["rtf_max"] >= row["rtf_median"] > 0
    assert results["join"]["others"] == 2 and results["join"]["joined_ms"] > 0


def test_engine_benchmark_refuses_bad_session_counts(capsys):
    import pytest

    with pytest.raises(SystemExit) as stop:
        engine.parse_args(["--sessions", "1,x"])
    assert stop.value.code == 2
    assert "--sessions" in capsys.readouterr().err
