"""Servers behind a balancer share nothing: a Twilio call's webhook answered by one server and its media
stream landing on another is still taken, because the stream token verifies on every server with the
same auth token; a server with another auth token refuses it."""

import asyncio
import xml.etree.ElementTree as ET
from pathlib import Path

from agent.runtime import AgentRuntime
from agent.server import create_app
from agent.spec import load_agent
from agent.testing.lines import serving
from agent.testing.twilio_caller import TwilioCaller, fetch_voice_twiml, sid

ROOT = Path(__file__).resolve().parents[2]
PUBLIC = "https://agents.example.com"  # the balancer: Twilio signs its URLs


def app(folder: Path, model, auth_token: str):
    folder.mkdir()
    path = folder / "agent.yaml"
    path.write_text(
        f"name: shared\nmodel: tiny\nvoice: {ROOT / 'examples/voices/demo'}\nresponse: {{max_seconds: 1}}\n"
        f"transports:\n  twilio: {{enabled: true, public_url: '{PUBLIC}', auth_token: {auth_token}}}\n"
    )
    return create_app(AgentRuntime(load_agent(path), model=model))


async def webhook(host: str, auth_token: str) -> tuple[str, str, dict]:
    call_sid = sid("CA")
    r = await fetch_voice_twiml(f"http://{host}", auth_token, public_base=PUBLIC, form={"CallSid": call_sid, "From": "+15550001111"})
    assert r.status_code == 200, r.text
    stream = ET.fromstring(r.text).find("Connect/Stream")
    return call_sid, stream.get("url"), {p.get("name"): p.get("value") for p in stream.findall("Parameter")}


async def stream_taken(host: str, auth_token: str, sign_url: str, params: dict, call_sid: str, runtime) -> bool:
    """Open the stream on `host` for 1.5 s; whether that server ran the call."""
    caller = TwilioCaller(f"ws://{host}/twilio/media", auth_token, sign_url=sign_url, parameters=params, call_sid=call_sid)
    run = asyncio.create_task(caller.run(seconds=1.5))
    seen = False
    while not run.done():
        seen = seen or call_sid in runtime.calls
        await asyncio.sleep(0.02)
    await run
    return seen


async def test_a_stream_token_from_one_server_opens_the_stream_on_another_with_the_same_auth_token(tmp_path, tiny_model):
    token = "shared-auth-token-for-both"
    first, second = app(tmp_path / "a", tiny_model, token), app(tmp_path / "b", tiny_model, token)
    async with serving(first) as host_a, serving(second) as host_b:
        call_sid, sign_url, params = await webhook(host_a, token)
        assert await stream_taken(host_b, token, sign_url, params, call_sid, second.state.runtime)
        assert first.state.runtime.metrics.calls.get("twilio", 0) == 0
        assert second.state.runtime.metrics.calls["twilio"] == 1


async def test_a_server_with_another_auth_token_refuses_the_stream(tmp_path, tiny_model):
    first, other = app(tmp_path / "a", tiny_model, "auth-token-one-xxxxxx"), app(tmp_path / "c", tiny_model, "auth-token-two-yyyyyy")
    async with serving(first) as host_a, serving(other) as host_c:
        call_sid, sign_url, params = await webhook(host_a, "auth-token-one-xxxxxx")
        # signed correctly for server c: only the stream token is foreign to it
        assert not await stream_taken(host_c, "auth-token-two-yyyyyy", sign_url, params, call_sid, other.state.runtime)
        assert other.state.runtime.metrics.dropped_input["twilio_bad_token"] == 1
