"""bench.records at its smallest: records off, on with SQLite, off again, every row with replies, records
written and one recording per call. Figures are not checked (bench/ measures, tests do not time)."""

from tests.bench.test_smoke import needs_espeak, run_bench


@needs_espeak
def test_records_bench_runs_off_and_on_and_the_on_run_writes_records_and_recordings(tmp_path):
    result = run_bench(
        "bench.records", "--calls", "2", "--seconds", "11", "--stores", "sqlite", out=tmp_path / "records.json"
    )
    off, on, again = result["runs"]
    assert (off["label"], on["label"], again["label"]) == ("off", "on, sqlite", "off, again")
    for run in (off, on, again):
        assert run["placed"] >= 2 and run["failed"] == 0 and run["replies"] >= 2, run
    assert off["records"] == {}  # records off: no writer, no record metrics
    assert on["records"]["chroma_records_written_total"] > 10 and on["records"]["chroma_records_lost_total"] == 0
    assert on["recordings"] == on["placed"] and on["recorded_seconds"] > 5 * on["placed"]
