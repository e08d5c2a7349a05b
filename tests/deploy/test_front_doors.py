"""Three call servers (`chroma-agent serve`, tiny model) behind the shipped front doors, for real on
loopback: Kamailio running deploy/kamailio.cfg for SIP (SIPp places the calls) and HAProxy running
deploy/haproxy.cfg for Twilio (the stand-in caller places them: signed webhook, then the media stream).

The tests share the servers and run in order, each leaving the set as the next expects: calls spread;
a full server (server 0, max_sessions 4) is skipped; server 2 is killed (its live calls are lost,
nothing else); server 1 is drained (its calls finish, new ones go to server 0, it exits 0).
"""

import asyncio
import signal
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from agent.testing.front_doors import (
    HAPROXY,
    KAMAILIO,
    SIPP,
    CallServer,
    HAProxy,
    Kamailio,
    SippRun,
    free_port,
    sip_options,
)
from agent.testing.twilio_caller import TwilioCaller, fetch_voice_twiml, sid

ROOT = Path(__file__).resolve().parents[2]
AUTH_TOKEN = "front-doors-test-auth-token"
ADMIN = "front-doors-test-admin-token"
FULL_AT = 4  # server 0's max_sessions

pytestmark = [
    pytest.mark.skipif(KAMAILIO is None, reason="kamailio is not installed (apt-get install kamailio)"),
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)"),
    pytest.mark.skipif(SIPP is None, reason="sipp is not installed (apt-get install sip-tester)"),
]


def agent_yaml(public_url: str, max_sessions: int) -> str:
    return f"""name: front doors
model: tiny
voice: {ROOT / "examples/voices/demo"}
max_sessions: {max_sessions}
drain_seconds: 30
turn:
  detector: silence
  silence_secs: 0.5
response:
  max_seconds: 1
transports:
  twilio:
    enabled: true
    public_url: {public_url}
    auth_token: {AUTH_TOKEN}
  sip:
    enabled: true
    port: {{sip_port}}
    rtp_ports: [{{rtp_first}}, {{rtp_last}}]
"""


class FrontDoors:
    def __init__(self, folder: Path):
        self.haproxy_port = free_port()
        public = f"http://127.0.0.1:{self.haproxy_port}"
        self.servers = [
            CallServer(folder / f"server-{i}", agent_yaml(public, FULL_AT if i == 0 else 32), env={"CHROMA_AGENTS_ADMIN_TOKEN": ADMIN})
            for i in range(3)
        ]
        self.kamailio = Kamailio(folder / "kamailio", [s.sip_port for s in self.servers], probe_seconds=1)
        self.haproxy = HAProxy(folder / "haproxy", [s.port for s in self.servers], port=self.haproxy_port)
        self.folder = folder
        self.runs = 0
        self.last_counts: dict[tuple[int, str], int] = {}

    def start(self) -> "FrontDoors":
        for server in self.servers:  # load their models side by side
            server.start()
        for server in self.servers:
            server.wait_ready()
        # A server's first call pays for imports and first-use set-up; the tests count calls, not that.
        for i, server in enumerate(self.servers):
            warm = SippRun(self.folder / f"warm-{i}", server.sip_port, calls=1, hold_ms=200, timeout=30).start().finish()
            if warm.successful != 1:
                raise RuntimeError(f"server {i} did not take a direct call:\n{warm.errors()}")
        self.kamailio.start()
        self.haproxy.start()
        return self

    def stop(self) -> None:
        for process in (self.haproxy, self.kamailio, *self.servers):
            process.stop()

    def sipp(self, **options) -> SippRun:
        self.runs += 1
        return SippRun(self.folder / f"sipp-{self.runs}", self.kamailio.port, **options).start()

    def sip_calls(self) -> list[int]:
        return self._counts("sip")

    def twilio_calls(self) -> list[int]:
        return self._counts("twilio")

    def _counts(self, transport: str) -> list[int]:
        """Calls each server has taken; a server gone keeps the count it last reported."""
        for server in self.servers:
            if server.alive:
                self.last_counts[(server.port, transport)] = server.calls(transport)
        return [self.last_counts.get((server.port, transport), 0) for server in self.servers]

    async def twilio_call(self, seconds: float) -> tuple[int, str | None]:
        """One call as Twilio places it, through HAProxy: (webhook status, the stream's close code or None)."""
        call_sid = sid("CA")
        base = self.haproxy.url
        r = await fetch_voice_twiml(base, AUTH_TOKEN, public_base=base, form={"CallSid": call_sid, "From": "+15550100100"})
        stream = ET.fromstring(r.text).find("Connect/Stream") if r.status_code == 200 else None
        if stream is None:
            return r.status_code, "no stream"
        params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
        caller = TwilioCaller(
            f"ws://127.0.0.1:{self.haproxy_port}/twilio/media", AUTH_TOKEN, sign_url=stream.get("url"),
            parameters=params, call_sid=call_sid,
        )  # fmt: skip
        timeline = await caller.run(seconds=seconds)
        # the stream ends when the caller hangs up after `seconds`; a refused one is closed at once
        refused = timeline.closed_by_server_at is not None and timeline.closed_by_server_at < seconds - 0.3
        return r.status_code, timeline.close_code if refused else None


@pytest.fixture(scope="module")
def doors(tmp_path_factory):
    started = FrontDoors(tmp_path_factory.mktemp("front-doors"))
    try:
        yield started.start()
    finally:
        started.stop()


def delta(after: list[int], before: list[int]) -> list[int]:
    return [a - b for a, b in zip(after, before, strict=True)]


async def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.2)


async def test_sip_calls_through_kamailio_spread_over_the_servers(doors):
    before = doors.sip_calls()
    run = await asyncio.to_thread(doors.sipp(calls=30, rate=5, hold_ms=400).finish)
    assert (run.successful, run.failed) == (30, 0), run.errors()
    spread = delta(doors.sip_calls(), before)
    assert sum(spread) == 30 and min(spread) >= 5, spread  # round robin: about 10 each


async def test_twilio_calls_through_haproxy_spread_over_the_servers(doors):
    before = doors.twilio_calls()
    results = await asyncio.gather(*(doors.twilio_call(seconds=3) for _ in range(6)))
    assert results == [(200, None)] * 6  # every webhook answered with a stream, no stream refused
    spread = delta(doors.twilio_calls(), before)
    assert sum(spread) == 6 and sum(1 for n in spread if n) >= 2, spread


async def test_a_full_server_is_skipped_by_both_front_doors(doors):
    full = doors.servers[0]
    sip_before, twilio_before = doors.sip_calls(), doors.twilio_calls()
    run = doors.sipp(calls=15, rate=10, hold_ms=8000, timeout=40)
    # Server 0 fills (max_sessions 4): it says so to Kamailio's probes and HAProxy's checks
    await wait_for(lambda: full.readyz()[0] == 503, 15, "server 0 full")
    assert await asyncio.to_thread(sip_options, full.sip_port) == 503
    await asyncio.sleep(1.5)  # HAProxy's next check (every 0.5 s) takes it out
    twilio = await asyncio.gather(*(doors.twilio_call(seconds=2) for _ in range(3)))
    await asyncio.to_thread(run.finish)
    assert (run.successful, run.failed) == (15, 0), run.errors()  # the calls server 0 refused went elsewhere
    sip = delta(doors.sip_calls(), sip_before)
    assert sip[0] <= FULL_AT and sum(sip) == 15, sip
    assert twilio == [(200, None)] * 3
    twilio_spread = delta(doors.twilio_calls(), twilio_before)
    assert twilio_spread[0] == 0 and sum(twilio_spread) == 3, twilio_spread


async def test_a_killed_server_loses_its_live_calls_and_nothing_else(doors):
    victim = doors.servers[2]
    await wait_for(lambda: sum(s.calls_active() for s in doors.servers) == 0, 20, "the servers idle")
    held = doors.sipp(calls=6, rate=10, hold_ms=10000, timeout=40)
    await wait_for(lambda: sum(s.calls_active() for s in doors.servers) == 6, 20, "6 calls up")
    lost = victim.calls_active()
    assert lost >= 1
    victim.signal(signal.SIGKILL)
    before = doors.sip_calls()
    after_kill = await asyncio.to_thread(doors.sipp(calls=6, rate=5, hold_ms=300, timeout=40).finish)
    assert (after_kill.successful, after_kill.failed) == (6, 0), after_kill.errors()
    assert sum(delta(doors.sip_calls(), before)) == 6
    webhooks = await asyncio.gather(*(doors.twilio_call(seconds=1) for _ in range(3)))
    assert webhooks == [(200, None)] * 3  # HAProxy retried the dead server's refused connections elsewhere
    await asyncio.to_thread(held.finish)
    assert (held.successful, held.failed) == (6 - lost, lost), held.errors()


async def test_a_drained_server_finishes_its_calls_takes_no_new_ones_and_exits_0(doors):
    draining, other = doors.servers[1], doors.servers[0]
    await wait_for(lambda: draining.calls_active() + other.calls_active() == 0, 20, "the servers idle")
    held = doors.sipp(calls=2, rate=10, hold_ms=6000, timeout=40)
    # Both held calls running before the drain, so the count below sees only the fresh ones.
    await wait_for(
        lambda: draining.calls_active() >= 1 and draining.calls_active() + other.calls_active() >= 2,
        20,
        "both held calls up, one on server 1",
    )
    draining.signal(signal.SIGTERM)
    await wait_for(lambda: draining.readyz()[1].get("reason") == "draining", 10, "server 1 draining")
    before = doors.sip_calls()
    fresh = await asyncio.to_thread(doors.sipp(calls=3, rate=5, hold_ms=300, timeout=30).finish)
    assert (fresh.successful, fresh.failed) == (3, 0), fresh.errors()
    new = delta(doors.sip_calls(), before)
    assert new[1] == 0 and sum(new) == 3, new  # none on the draining server (another may be down)
    webhook = await doors.twilio_call(seconds=1)
    assert webhook == (200, None)  # a webhook on server 1 was answered 503 and retried by HAProxy
    await asyncio.to_thread(held.finish)
    assert (held.successful, held.failed) == (2, 0), held.errors()  # its live call finished
    assert await asyncio.to_thread(draining.wait, 30) == 0
