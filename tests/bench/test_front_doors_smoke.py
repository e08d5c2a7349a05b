"""bench.front_doors end to end at its smallest: 1 and 2 servers behind HAProxy and Kamailio, a call per
server, a few set-up timings. Figures are not checked (bench/ measures); the rows must come from calls
that were answered and heard, and from set-ups that happened."""

import pytest

from agent.testing.front_doors import HAPROXY, KAMAILIO, SIPP
from tests.bench.test_smoke import needs_espeak, run_bench


@needs_espeak
@pytest.mark.skipif(None in (KAMAILIO, HAPROXY, SIPP), reason="needs kamailio, haproxy and sipp (apt-get install kamailio haproxy sip-tester)")
def test_front_doors_bench_carries_calls_on_one_and_two_servers_and_times_both_doors(tmp_path):
    result = run_bench(
        "bench.front_doors", "--servers", "1,2", "--calls-per-server", "1", "--latency-samples", "3",
        out=tmp_path / "front_doors.json", timeout=400,
    )  # fmt: skip
    one, two = result["carried"]
    assert (one["servers"], one["calls"], two["servers"], two["calls"]) == (1, 1, 2, 2)
    for row in (one, two):
        assert row["answered"] == row["calls"] and row["replies"] >= 1, row
        assert sum(row["per_server"]) == row["calls"], row
    latency = result["latency"]
    for key in ("invite_direct", "invite_kamailio", "webhook_direct", "webhook_haproxy"):
        assert len(latency[key]) == 3, (key, latency)
    assert latency["invite_direct_failed"] == latency["invite_kamailio_failed"] == 0
