"""Graceful drain of one server: `chroma-agent serve` (tiny model, SIP on) as a subprocess, SIGTERM while a
SIP call is live; and POST /admin/drain on the app itself."""

import asyncio
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from agent.runtime import AgentRuntime
from agent.server import create_app
from agent.spec import load_agent
from agent.testing.front_doors import CallServer, sip_options
from processors.audio import ulaw_decode
from transports.sip.caller import SipCaller, SipCallFailed

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "test-admin-token-0123456789"
def agent_yaml(drain_seconds: float) -> str:
    """The agent file for CallServer (which fills in the ports): tiny model, SIP and WebRTC on."""
    return f"""name: drain test agent
model: tiny
voice: {ROOT / "examples/voices/demo"}
drain_seconds: {drain_seconds}
turn:
  detector: silence
  silence_secs: 0.5
response:
  max_seconds: 1
transports:
  sip:
    enabled: true
    port: {{sip_port}}
    rtp_ports: [{{rtp_first}}, {{rtp_last}}]
"""


@pytest.fixture
def server(tmp_path, request):
    """A started server with drain_seconds from the test's parameter; stopped (and killed if need be) after."""
    started = CallServer(tmp_path, agent_yaml(request.param), env={"CHROMA_AGENTS_ADMIN_TOKEN": ADMIN})
    try:
        yield started.start().wait_ready()
    finally:
        started.stop()


def loud_packets(caller: SipCaller, since: float) -> int:
    """RTP packets after `since` carrying sound (the tiny model's voice is noise; the idle line is silence)."""
    count = 0
    for packet in caller.received:
        if packet.arrival >= since:
            pcm = ulaw_decode(packet.payload).astype(np.float64)
            count += bool(pcm.size) and float(np.sqrt((pcm**2).mean())) > 200
    return count


async def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("server", [60], indirect=True)
async def test_sigterm_refuses_new_calls_lets_the_live_one_finish_and_exits_0(server):
    caller = SipCaller("127.0.0.1", server.sip_port)
    await caller.dial()
    await wait_for(lambda: server.calls_active() == 1, 20, "the call running")
    server.signal(signal.SIGTERM)

    await wait_for(lambda: server.readyz()[1].get("reason") == "draining", 10, "/readyz saying draining")
    status, body = server.readyz()
    assert status == 503 and body["draining"] is True and body["calls_active"] == 1
    assert await asyncio.to_thread(sip_options, server.sip_port) == 503
    with pytest.raises(SipCallFailed) as refused:
        await SipCaller("127.0.0.1", server.sip_port).dial()
    assert refused.value.status == 503
    assert server.get("/api/offer")[0] in (405, 503)  # a GET is not an offer; the POST is tested below

    await asyncio.sleep(2)
    assert server.alive and not caller.ended_by_peer.is_set()  # the live call goes on
    assert await caller.hang_up() == 200
    assert await asyncio.to_thread(server.wait, 30) == 0
    assert "drained in" in server.log()


@pytest.mark.parametrize("server", [1], indirect=True)
async def test_past_drain_seconds_the_caller_hears_a_goodbye_then_bye_and_the_server_exits_0(server):
    caller = SipCaller("127.0.0.1", server.sip_port)
    await caller.dial()
    await wait_for(lambda: server.calls_active() == 1, 20, "the call running")
    await asyncio.sleep(1.0)
    assert loud_packets(caller, 0) == 0  # the caller said nothing: the agent has been silent
    sent = time.monotonic()
    server.signal(signal.SIGTERM)
    await asyncio.wait_for(caller.ended_by_peer.wait(), 40)  # the server's BYE
    assert time.monotonic() - sent >= 1.0  # not before drain_seconds
    assert loud_packets(caller, sent) > 5, "no goodbye was heard before the BYE"
    caller.close()
    assert await asyncio.to_thread(server.wait, 30) == 0
    assert "saying goodbye on 1 call" in server.log()


@pytest.mark.parametrize("server", [60], indirect=True)
async def test_a_second_sigterm_ends_at_once_and_hangs_up(server):
    caller = SipCaller("127.0.0.1", server.sip_port)
    await caller.dial()
    await wait_for(lambda: server.calls_active() == 1, 20, "the call running")
    server.signal(signal.SIGTERM)
    await wait_for(lambda: server.readyz()[1].get("reason") == "draining", 10, "/readyz saying draining")
    server.signal(signal.SIGTERM)
    await asyncio.wait_for(caller.ended_by_peer.wait(), 15)
    caller.close()
    assert await asyncio.to_thread(server.wait, 15) is not None  # well before drain_seconds (60)


# -- POST /admin/drain, in process ------------------------------------------------------------------


@pytest.fixture
def app(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("CHROMA_AGENTS_ADMIN_TOKEN", ADMIN)
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"name: drain app\nmodel: tiny\nvoice: {ROOT / 'examples/voices/demo'}\ndrain_seconds: 5\n"
        "transports:\n  twilio: {enabled: true, public_url: 'https://agent.example.com', auth_token: tok}\n"
    )
    return create_app(AgentRuntime(load_agent(path), model=tiny_model))


def test_admin_drain_needs_the_admin_token(app):
    with TestClient(app) as client:
        assert client.post("/admin/drain").status_code == 401
        assert client.post("/admin/drain", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/readyz").status_code == 200
        assert app.state.runtime.draining is False


def test_admin_drain_turns_every_door_away_and_finishes_with_no_calls(app):
    with TestClient(app) as client:
        r = client.post("/admin/drain", headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 202 and r.json() == {"draining": True, "calls_left": 0, "drain_seconds": 5}
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["reason"] == "draining"
        offer = client.post("/api/offer", json={"sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n", "type": "offer"})
        assert offer.status_code == 503 and offer.json()["reason"] == "draining"
        # Twilio's webhook: 503 before even checking the signature is not wanted, so it is signed
        from twilio.request_validator import RequestValidator

        form = {"CallSid": "CA" + "0" * 32, "From": "+15550001111"}
        signature = RequestValidator("tok").compute_signature("https://agent.example.com/twilio/voice", form)
        hook = client.post("/twilio/voice", data=form, headers={"X-Twilio-Signature": signature})
        assert hook.status_code == 503
        deadline = time.monotonic() + 5
        while not app.state.drain.done.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.state.drain.done.is_set()  # no calls: over at once


@pytest.mark.parametrize("server", [60], indirect=True)
def test_chroma_agent_drain_drains_the_server_and_waits_for_it_to_exit(server):
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "agent.cli", "drain", "--url", server.url, "--wait", "30"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    no_token = subprocess.run(command, env={k: v for k, v in env.items() if k != "CHROMA_AGENTS_ADMIN_TOKEN"},
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    assert no_token.returncode == 2 and "CHROMA_AGENTS_ADMIN_TOKEN" in no_token.stderr
    assert server.alive
    done = subprocess.run(command, env={**env, "CHROMA_AGENTS_ADMIN_TOKEN": ADMIN}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "draining: 0 call(s) left" in done.stdout and "the server has exited" in done.stdout
    assert server.wait(10) == 0


async def test_past_drain_seconds_a_twilio_caller_hears_the_goodbye_then_the_stream_closes(tmp_path, tiny_model):
    import xml.etree.ElementTree as ET

    from agent.server import begin_drain
    from agent.testing.lines import serving
    from agent.testing.twilio_caller import TICK, TwilioCaller, fetch_voice_twiml, sid

    public, token = "https://agent.example.com", "drain-twilio-auth-token"
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"name: drain twilio\nmodel: tiny\nvoice: {ROOT / 'examples/voices/demo'}\ndrain_seconds: 1\n"
        f"transports:\n  twilio: {{enabled: true, public_url: '{public}', auth_token: {token}}}\n"
    )
    app = create_app(AgentRuntime(load_agent(path), model=tiny_model))
    async with serving(app) as host:
        call_sid = sid("CA")
        r = await fetch_voice_twiml(f"http://{host}", token, public_base=public, form={"CallSid": call_sid})
        stream = ET.fromstring(r.text).find("Connect/Stream")
        params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
        caller = TwilioCaller(f"ws://{host}/twilio/media", token, sign_url=stream.get("url"), parameters=params, call_sid=call_sid)
        run = asyncio.create_task(caller.run(seconds=30))
        await wait_for(lambda: call_sid in app.state.runtime.calls, 10, "the call running")
        await asyncio.sleep(0.5)
        drained_at = caller.now()
        drain = begin_drain(app)
        timeline = await asyncio.wait_for(run, 40)
        await asyncio.wait_for(drain, 10)
    assert timeline.closed_by_server_at is not None and timeline.closed_by_server_at < 25  # hung up, not by us
    assert timeline.closed_by_server_at - drained_at >= 1.0  # not before drain_seconds
    heard = [i * TICK for i, on in enumerate(timeline.playing) if on]
    assert heard and heard[0] >= drained_at + 0.9, "the goodbye came before the limit, or never"
    assert app.state.drain.ended_politely == 1 and app.state.drain.cancelled == 0
