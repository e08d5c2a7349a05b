"""bench.codec_batch's smoke run: a row per call count, decoded alone and together (not how fast)."""

import re

from bench import codec_batch


def test_codec_batch_benchmark_prints_a_row_per_call_count(capsys):
    codec_batch.main(["--calls", "1,3", "--ticks", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "3"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(float(c.rstrip("x")) > 0 for c in cells[1:])
