"""Each benchmark runs end to end at its smallest settings and produces its rows, with replies in them.

Figures are not checked (bench/ measures, tests do not time): a benchmark whose every reply fails, as
bench.pipeline's did when its stand-in session lagged behind ChromaSession, must fail here instead of
printing a table of zeros."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.pipeline.common import BASELINE_TOOL

ROOT = Path(__file__).resolve().parents[2]
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
needs_sipp = pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp is not installed (apt-get install sip-tester)")


def run_bench(module: str, *args: str, out: Path, timeout: float = 300) -> dict:
    """`python -m module args --json out`; the JSON it wrote. A failed run shows its output's end."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args, "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, f"{module} exited {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return json.loads(out.read_text())


@needs_espeak
@pytest.mark.skipif(not BASELINE_TOOL.exists(), reason=f"pipecat's baseline tool is not at {BASELINE_TOOL}")
def test_pipeline_bench_runs_ours_and_pipecats_server_and_both_answer(tmp_path):
    result = run_bench(
        "bench.pipeline", "--only", "concurrency", "--calls", "1", "--seconds", "5", "--no-retry",
        out=tmp_path / "pipeline.json",
    )  # fmt: skip
    servers = {server["label"]: server["reports"]["1"] for server in result["concurrency"]["servers"]}
    assert any(label.startswith("pipecat") for label in servers) and any(
        label.startswith("chroma-agents") for label in servers
    ), list(servers)
    for label, report in servers.items():
        assert "error" not in report, (label, report)
        assert report["replies_expected"] >= 1 and report["replies_completed"] >= 1, (label, report)


@needs_espeak
@needs_sipp
def test_phone_bench_places_twilio_and_sip_calls_that_get_answers(tmp_path):
    result = run_bench(
        "bench.phone", "--calls", "3", "--seconds", "11", out=tmp_path / "phone.json"
    )
    (twilio,) = result["twilio"]
    assert twilio["placed"] >= 1 and twilio["failed"] == 0 and twilio["replies"] >= 1, twilio
    (sip,) = result["sip"]
    assert sip["sipp_exit"] == 0 and sip["sipp_calls"] == 1
    assert [probe["replies"] >= 1 for probe in sip["probes"]] == [True, True], sip["probes"]


def test_tools_bench_times_every_lookahead_and_a_whole_call(tmp_path):
    result = run_bench(
        "bench.tools", "--device", "cpu", "--repeats", "1", "--call-turns", "1", out=tmp_path / "tools.json"
    )
    assert set(result["lookahead"]) == {"0", "3", "8"}
    for row in result["lookahead"].values():
        assert all(row[key] > 0 for key in ("result_to_audio_p50_ms", "ttfa_filter_ms", "ttfa_plain_ms")), row
    assert result["filter_us_per_token"] > 0
    assert isinstance(result["whole_call"], list) and len(result["whole_call"]) == 1, result["whole_call"]


def test_voices_bench_times_a_cached_and_a_rebuilt_prefix(tmp_path):
    result = run_bench(
        "bench.voices", "--device", "cpu", "--seconds", "3", "--repeats", "1", "--frames", "2",
        out=tmp_path / "voices.json",
    )  # fmt: skip
    (row,) = result["rows"].values()
    assert row["seconds"] == 3.0 and row["prompt_positions"] > 0
    assert row["ttfa_cached_ms"] > 0 and row["ttfa_per_response_ms"] > 0
