"""Twilio phone calls end to end: the server on 127.0.0.1 (uvicorn), a Twilio stand-in on the other end
of the Media Stream (agent/testing/twilio_caller.py), the tiny model, and a local stand-in for
Twilio's REST API."""

import asyncio
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import numpy as np
import pytest
import websockets
from fastapi import FastAPI
from loguru import logger
from pipecat.frames.frames import InputDTMFFrame

from agent.lines.twilio import TwilioConfigError, twilio_router
from agent.runtime import AgentRuntime
from agent.server import create_app
from agent.spec import load_agent
from agent.testing.lines import serving
from agent.testing.twilio_caller import TwilioCaller, fetch_voice_twiml, sid
from agent.testing.twilio_cloud import LocalTwilioCloud
from tests.agent.test_call import agent_file as call_agent_file
from tests.speech import requires_espeak, synthesize

TOKEN = "f" * 32
ACCOUNT = "AC" + "a" * 32
PUBLIC = "https://agent.example.com"
STREAM_URL = "wss://agent.example.com/twilio/media"
FRAME_SECS = 0.08


def agent_file(tmp_path, *, max_seconds=1, max_calls=4, twilio="") -> Path:
    """The whole-call tests' agent (tests/agent/test_call.py) with Twilio calls switched on."""
    twilio = (
        twilio or f"{{enabled: true, auth_token: {TOKEN}, account_sid: {ACCOUNT}, max_calls: {max_calls}}}"
    )
    path = call_agent_file(tmp_path, max_seconds=max_seconds)
    path.write_text(path.read_text() + f"\ntransports:\n  twilio: {twilio}\n")
    return path


def runtime_for(tmp_path, tiny_model, **kw) -> AgentRuntime:
    return AgentRuntime(load_agent(agent_file(tmp_path, **kw)), model=tiny_model)


# --- Twilio's REST API, locally -----------------------------------------------------------------


@pytest.fixture
def rest():
    with LocalTwilioCloud.running(ACCOUNT, TOKEN) as cloud:
        yield cloud


def form(request: dict) -> dict:
    return parse_qs(request["body"])


# --- the server ----------------------------------------------------------------------------------


def app_with_rest(runtime, rest_client) -> FastAPI:
    app = FastAPI()
    app.include_router(twilio_router(runtime, PUBLIC, rest_client=rest_client))
    return app


async def dial(host: str, call_sid: str | None = None) -> TwilioCaller:
    """What Twilio does for an incoming call: fetch the TwiML, then open the stream it names."""
    call_sid = call_sid or sid("CA")
    r = await fetch_voice_twiml(
        f"http://{host}", TOKEN, public_base=PUBLIC, form={"CallSid": call_sid, "From": "+15550001111"}
    )
    assert r.status_code == 200, r.text
    stream = ET.fromstring(r.text).find("Connect/Stream")
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    return TwilioCaller(
        f"ws://{host}/twilio/media", TOKEN, sign_url=stream.get("url"), parameters=params, call_sid=call_sid
    )


async def wait_call(runtime, call_sid, timeout=5.0):
    for _ in range(int(timeout / 0.01)):
        if call_sid in runtime.calls:
            return runtime.calls[call_sid]
        await asyncio.sleep(0.01)
    raise AssertionError(f"call {call_sid} never started")


async def call_alive_at(runtime, call_sid, seconds) -> bool:
    await asyncio.sleep(seconds)
    return call_sid in runtime.calls


def dropped(runtime, reason: str) -> int:
    return runtime.metrics.dropped_input[reason]


# --- webhook and handshake ---------------------------------------------------------------------------


async def test_voice_webhook_needs_twilio_signature(tmp_path, tiny_model):
    runtime = runtime_for(tmp_path, tiny_model)
    async with serving(create_app(runtime, public_url=PUBLIC)) as host:
        form = {"CallSid": sid("CA")}
        missing = await fetch_voice_twiml(
            f"http://{host}", TOKEN, public_base=PUBLIC, form=form, signature=""
        )
        wrong = await fetch_voice_twiml(f"http://{host}", "0" * 32, public_base=PUBLIC, form=form)
        other_url = await fetch_voice_twiml(
            f"http://{host}", TOKEN, public_base="http://agent.example.com", form=form
        )
        good = await fetch_voice_twiml(f"http://{host}", TOKEN, public_base=PUBLIC, form=form)
    assert [missing.status_code, wrong.status_code, other_url.status_code, good.status_code] == [
        403,
        403,
        403,
        200,
    ]
    assert dropped(runtime, "twilio_bad_signature") == 3


async def test_voice_webhook_answers_connect_stream_with_agent_and_token(tmp_path, tiny_model):
    runtime = runtime_for(tmp_path, tiny_model)
    async with serving(create_app(runtime, public_url=PUBLIC)) as host:
        r = await fetch_voice_twiml(f"http://{host}", TOKEN, public_base=PUBLIC, form={"CallSid": sid("CA")})
    assert r.headers["content-type"].startswith("application/xml")
    root = ET.fromstring(r.text)
    assert [c.tag for c in root] == ["Connect"]
    stream = root.find("Connect/Stream")
    assert stream.get("url") == STREAM_URL
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert params["agent"] == runtime.spec.name and params["token"]


async def test_media_upgrade_refused_with_403_without_or_with_wrong_signature(tmp_path, tiny_model):
    runtime = runtime_for(tmp_path, tiny_model)
    async with serving(create_app(runtime, public_url=PUBLIC)) as host:
        from twilio.request_validator import RequestValidator

        signatures = [
            None,
            RequestValidator(TOKEN).compute_signature("https://agent.example.com/twilio/media", {}),
        ]
        for signature in signatures:
            headers = {"X-Twilio-Signature": signature} if signature else {}
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(f"ws://{host}/twilio/media", additional_headers=headers):
                    pass
            assert refused.value.response.status_code == 403
    assert dropped(runtime, "twilio_bad_signature") == 2


async def test_stream_whose_token_does_not_check_is_closed(tmp_path, tiny_model):
    runtime = runtime_for(tmp_path, tiny_model)
    async with serving(create_app(runtime, public_url=PUBLIC)) as host:
        issued = await dial(host)
        # A token issued for one call, presented by another.
        other = TwilioCaller(issued.url, TOKEN, sign_url=STREAM_URL, parameters=issued.parameters)
        timeline = await other.run(seconds=3)
    assert timeline.close_code == 1008 and timeline.closed_by_server_at < 3
    assert dropped(runtime, "twilio_bad_token") == 1
    assert runtime.metrics.calls["twilio"] == 0


async def test_busy_when_max_calls_are_up(tmp_path, tiny_model):
    runtime = runtime_for(tmp_path, tiny_model, max_calls=1)
    async with serving(create_app(runtime, public_url=PUBLIC)) as host:
        first = await dial(host)
        running = asyncio.create_task(first.run(seconds=2))
        await wait_call(runtime, first.call_sid)
        r = await fetch_voice_twiml(f"http://{host}", TOKEN, public_base=PUBLIC, form={"CallSid": sid("CA")})
        await running
    reject = ET.fromstring(r.text).find("Reject")
    assert reject is not None and reject.get("reason") == "busy"


async def test_a_stream_token_opens_one_stream_only_even_after_its_call_ended(tmp_path, tiny_model):
    runtime = runtime_for(tmp_path, tiny_model)
    async with serving(create_app(runtime, public_url=PUBLIC)) as host:
        first = await dial(host)
        await first.run(seconds=1)  # a whole call: start, media, stop
        await asyncio.sleep(0.2)
        assert runtime.calls == {} and runtime.metrics.calls["twilio"] == 1
        # The same token (within its 60 s) for a new stream of the same call: refused.
        replay = TwilioCaller(
            first.url, TOKEN, sign_url=STREAM_URL, parameters=first.parameters, call_sid=first.call_sid
        )
        timeline = await replay.run(seconds=3)
    assert timeline.close_code == 1008 and timeline.closed_by_server_at < 3
    assert dropped(runtime, "twilio_bad_token") == 1
    assert runtime.metrics.calls["twilio"] == 1


async def test_busy_when_max_sessions_are_up_across_transports(tmp_path, tiny_model):
    runtime = runtime_for(tmp_path, tiny_model, max_calls=4)
    runtime.max_sessions = 1
    runtime.reserve("sip-call-awaiting-its-ack")  # another transport holds the one session
    async with serving(create_app(runtime, public_url=PUBLIC)) as host:
        r = await fetch_voice_twiml(f"http://{host}", TOKEN, public_base=PUBLIC, form={"CallSid": sid("CA")})
        assert (await fetch_ready(host)).status_code == 503
        runtime.release("sip-call-awaiting-its-ack")
        ok = await fetch_voice_twiml(f"http://{host}", TOKEN, public_base=PUBLIC, form={"CallSid": sid("CA")})
        assert (await fetch_ready(host)).status_code == 200
    reject = ET.fromstring(r.text).find("Reject")
    assert reject is not None and reject.get("reason") == "busy"
    assert ET.fromstring(ok.text).find("Connect/Stream") is not None
    assert runtime.metrics.calls_refused[("twilio", "at_capacity")] == 1


async def test_busy_while_the_engine_is_behind_real_time(tmp_path, tiny_model):
    runtime = runtime_for(tmp_path, tiny_model)
    runtime.engine_status = lambda: {"behind_real_time": True, "batch_size": 32, "tick_seconds": 0.09, "sessions": 32}
    async with serving(create_app(runtime, public_url=PUBLIC)) as host:
        r = await fetch_voice_twiml(f"http://{host}", TOKEN, public_base=PUBLIC, form={"CallSid": sid("CA")})
    reject = ET.fromstring(r.text).find("Reject")
    assert reject is not None and reject.get("reason") == "busy"
    assert runtime.metrics.calls_refused[("twilio", "engine_behind_real_time")] == 1


async def fetch_ready(host: str):
    async with httpx.AsyncClient() as client:
        return await client.get(f"http://{host}/readyz")


def test_twilio_enabled_without_token_or_public_url_fails_at_app_creation(tmp_path, tiny_model, monkeypatch):
    monkeypatch.delenv("TWILIO_AUTH_TOKEN", raising=False)
    no_token = AgentRuntime(load_agent(agent_file(tmp_path, twilio="{enabled: true}")), model=tiny_model)
    with pytest.raises(TwilioConfigError, match=r"transports\.twilio\.auth_token.*TWILIO_AUTH_TOKEN"):
        create_app(no_token, public_url=PUBLIC)
    no_url = runtime_for(tmp_path, tiny_model)
    with pytest.raises(TwilioConfigError, match=r"public_url.*--public-url"):
        create_app(no_url)


# --- calls over the wire -------------------------------------------------------------------------------


@requires_espeak
async def test_phone_call_caller_speaks_and_hears_the_agent_with_marks_and_no_gaps(tmp_path, tiny_model):
    runtime = runtime_for(tmp_path, tiny_model)
    speech = synthesize("Hello, I would like to check on my order please.", 8000)
    speech_end = 0.3 + len(speech) / 8000
    async with serving(create_app(runtime, public_url=PUBLIC)) as host:
        caller = await dial(host)
        timeline = await caller.run(speech, audio_at=0.3, seconds=speech_end + 3.5)
    replies = timeline.replies()
    assert replies and replies[0][0] > speech_end  # the agent answered after the caller finished
    heard = timeline.heard[round(replies[0][0] * 8000) : round((replies[0][1] + 0.02) * 8000)].astype(
        np.float64
    )
    assert np.sqrt(np.mean(heard**2)) > 100  # audible agent audio, not silence
    assert timeline.gaps() == []
    assert timeline.marks_received and [n for _, n in timeline.marks_echoed] == [
        n for _, n in timeline.marks_received
    ]
    assert timeline.marks_received[-1][0] >= timeline.media_times[-1]  # the reply's last audio is marked too
    lag = [e - r for (r, _), (e, _) in zip(timeline.marks_received, timeline.marks_echoed, strict=True)]
    print(
        f"\nreply {replies[0][1] - replies[0][0] + 0.02:.2f} s, {len(timeline.media_times)} media, "
        f"mark echo lag median {np.median(lag) * 1000:.0f} ms, max {max(lag) * 1000:.0f} ms"
    )


@requires_espeak
async def test_barge_in_clears_twilio_and_cuts_the_reply_to_what_the_caller_heard(tmp_path, tiny_model):
    runtime = runtime_for(tmp_path, tiny_model, max_seconds=8)
    question = synthesize("Can you tell me about my delivery?", 8000)
    interruption = synthesize("Wait, stop, that is not what I asked.", 8000)
    async with serving(create_app(runtime, public_url=PUBLIC)) as host:
        caller = await dial(host)
        running = asyncio.create_task(
            caller.run(
                question, audio_at=0.3, barge_in=(interruption, 1.0), seconds=0.3 + len(question) / 8000 + 6
            )
        )
        call = await wait_call(runtime, caller.call_sid)
        timeline = await running
    assert timeline.clear_times, "the caller never got a clear"
    clear_at = timeline.clear_times[0]
    assert timeline.barge_in_at < clear_at
    assert call.stats.barge_ins >= 1
    heard_frames, sent_frames = call.stats.cut_replies[0]
    assert heard_frames <= sent_frames
    reply_start = timeline.reply_starts[0]
    played = timeline.played_seconds_between(reply_start, clear_at)
    print(
        f"\nbarge-in: caller played {played:.2f} s before clear ({clear_at - timeline.barge_in_at:.2f} s after "
        f"talking over it); agent kept {heard_frames} of {sent_frames} frames ({heard_frames * FRAME_SECS:.2f} s)"
    )
    # Kept: whole 80 ms frames whose marks came back before the barge-in; the caller went on playing the
    # lead until the clear arrived.
    assert played - 0.45 <= heard_frames * FRAME_SECS <= played + 0.02


async def test_dtmf_reaches_the_pipeline_and_the_callers_number_reaches_the_flow_state(tmp_path, tiny_model):
    runtime = runtime_for(tmp_path, tiny_model)
    async with serving(create_app(runtime, public_url=PUBLIC)) as host:
        caller = await dial(host)
        running = asyncio.create_task(caller.run(seconds=2.0, dtmf=[(1.0, "5"), (1.2, "#")]))
        call = await wait_call(runtime, caller.call_sid)
        seen = []

        @call.aggregators.user().event_handler("on_before_process_frame")
        def _seen(_processor, frame):
            if isinstance(frame, InputDTMFFrame):
                seen.append(frame.button.value)

        await running
    assert seen == ["5", "#"]
    assert call.flow_state["caller_number"] == "+15550001111"  # the webhook's From, for the flow


async def test_agent_hang_up_hangs_up_the_call_over_rest(tmp_path, tiny_model, rest):
    runtime = runtime_for(tmp_path, tiny_model)
    async with serving(app_with_rest(runtime, rest.client)) as host:
        caller = await dial(host)
        running = asyncio.create_task(caller.run(seconds=6))
        call = await wait_call(runtime, caller.call_sid)
        await asyncio.sleep(0.5)
        await call.hang_up()
        timeline = await running
    assert timeline.closed_by_server_at is not None and timeline.closed_by_server_at < 5
    [request] = rest.requests
    assert request["path"] == f"/2010-04-01/Accounts/{ACCOUNT}/Calls/{caller.call_sid}.json"
    assert ET.fromstring(form(request)["Twiml"][0]).find("Hangup") is not None


async def test_transfer_dials_the_target_over_rest(tmp_path, tiny_model, rest):
    runtime = runtime_for(tmp_path, tiny_model)
    async with serving(app_with_rest(runtime, rest.client)) as host:
        caller = await dial(host)
        running = asyncio.create_task(caller.run(seconds=1.5))
        call = await wait_call(runtime, caller.call_sid)
        assert await call.line.transfer("+14155550100")
        assert not await call.line.transfer("not a number")  # logged, never raised
        await running
    [request] = rest.requests
    assert request["path"].endswith(f"/Calls/{caller.call_sid}.json")
    dial_verb = ET.fromstring(form(request)["Twiml"][0]).find("Dial")
    assert dial_verb.find("Number").text == "+14155550100"


@requires_espeak
async def test_bad_input_is_counted_logged_once_and_spares_the_call_and_its_neighbour(tmp_path, tiny_model):
    runtime = runtime_for(tmp_path, tiny_model)
    speech = synthesize("Hello, is anyone there?", 8000)
    media = lambda payload: json.dumps(  # noqa: E731
        {
            "event": "media",
            "streamSid": "MZ" + "0" * 32,
            "media": {"chunk": "1", "timestamp": "0", "payload": payload},
        }
    )
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")
    try:
        async with serving(create_app(runtime, public_url=PUBLIC)) as host:
            noisy, neighbour = await dial(host), await dial(host)
            noisy_media = lambda payload: media(payload).replace("MZ" + "0" * 32, noisy.stream_sid)  # noqa: E731
            bad = [
                (0.5, "{not json"),
                (0.6, "{not json either"),
                (0.7, json.dumps({"event": "hello", "streamSid": noisy.stream_sid})),
                (0.8, noisy_media("***not base64***")),
                (0.9, noisy_media("A" * 20000)),
            ]
            noisy_run = noisy.run(seconds=4, raw=bad, before_start=[media("/w==")], vanish_at=2.5)
            neighbour_run = neighbour.run(speech, audio_at=0.3, seconds=0.3 + len(speech) / 8000 + 3)
            still_running = asyncio.create_task(call_alive_at(runtime, noisy.call_sid, 2.0))
            noisy_tl, neighbour_tl = await asyncio.gather(noisy_run, neighbour_run)
            assert await still_running, "bad input ended the call"
            await asyncio.sleep(0.3)
            assert noisy.call_sid not in runtime.calls  # the vanished caller's call ended
            import httpx

            async with httpx.AsyncClient() as client:
                text = (await client.get(f"http://{host}/metrics")).text
    finally:
        logger.remove(sink)
    for reason, n in [
        ("bad_json", 2),
        ("unknown_event", 1),
        ("bad_base64", 1),
        ("bad_payload_length", 1),
        ("media_before_start", 1),
    ]:
        assert f'chroma_agents_dropped_input_total{{reason="twilio_{reason}"}} {n}' in text
    assert sum("dropped bad input bad_json" in w for w in warnings) == 1  # logged once per call
    assert neighbour_tl.replies() and neighbour_tl.gaps() == []
