"""Phone calls leave records: a Twilio call (the Twilio stand-in caller on the agent's real routes) and
a SIP call (SIPp through the real SipServer and RTP), each read back with its transport's ids, events,
end reason and stereo recording; busy refusals as records; the web view's routes and their guard."""

import asyncio
import random
import shutil
import socket
import wave

import httpx
import numpy as np

from agent.lines.sip import sip_server
from agent.runtime import AgentRuntime
from agent.server import create_app
from agent.spec import load_agent
from agent.testing.lines import serving
from records.recording import drain_recordings
from records.store import open_store
from tests.agent import test_sip_call as sip_tests
from tests.agent.test_twilio_call import PUBLIC, TOKEN, dial, wait_call
from tests.agent.test_twilio_call import agent_file as twilio_agent_file
from tests.speech import requires_espeak, synthesize

RECORDS = "\nrecords: {recordings: recordings}\n"


def stored(runtime: AgentRuntime, record_id: str):
    store = open_store(runtime.records.config.database)
    try:
        return store.get_call(record_id)
    finally:
        store.close()


def stereo(path: str) -> tuple[int, np.ndarray]:
    drain_recordings()
    with wave.open(path) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (2, 2)
        return w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), np.int16).reshape(-1, 2)


def onset(channel: np.ndarray, rate: int, after: float = 0.0, level: int = 300) -> float:
    """Seconds to the first 20 ms block louder than `level` (RMS) at or after `after`."""
    block = rate // 50
    start = round(after * rate) // block
    for i in range(start, len(channel) // block):
        piece = channel[i * block : (i + 1) * block].astype(np.float64)
        if np.sqrt(np.mean(piece**2)) > level:
            return i * block / rate
    raise AssertionError("no sound")


@requires_espeak
async def test_a_twilio_call_is_recorded_with_its_call_sid_and_a_stereo_recording_on_the_calls_timeline(
    tmp_path, tiny_model
):
    path = twilio_agent_file(tmp_path)
    path.write_text(path.read_text() + RECORDS)
    runtime = AgentRuntime(load_agent(path), model=tiny_model)
    speech = synthesize("Hello, I would like to check on my order please.", 8000)
    async with serving(create_app(runtime, public_url=PUBLIC)) as host:
        caller = await dial(host)
        running = asyncio.create_task(caller.run(speech, audio_at=0.3, seconds=0.3 + len(speech) / 8000 + 3.5))
        call = await wait_call(runtime, caller.call_sid)
        timeline = await running
        for _ in range(200):  # the call ends on the caller's `stop`
            if caller.call_sid not in runtime.calls:
                break
            await asyncio.sleep(0.05)
        await runtime.close()
        async with httpx.AsyncClient(base_url=f"http://{host}") as http:
            listed = (await http.get("/api/calls", params={"transport": "twilio"})).json()["calls"]
            one = (await http.get(f"/api/calls/{call.record_id}")).json()
            audio = await http.get(f"/api/calls/{call.record_id}/recording")
    assert timeline.gaps() == []  # records and recording on: the caller still hears no gap
    assert [c["call_id"] for c in listed] == [call.record_id]
    info = one["call"]
    assert info["transport_ids"]["call_sid"] == caller.call_sid and info["caller"] == "+15550001111"
    assert info["end_reason"] == "caller_hung_up" and info["has_recording"]
    kinds = [e["kind"] for e in one["events"]]
    assert {"caller_turn_started", "caller_turn_ended", "reply_started", "first_audio", "agent_reply"} <= set(kinds)
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/wav"

    _record, _events = stored(runtime, call.record_id)
    rate, pcm = stereo(_record.recording)
    assert rate == 8000
    # On the call's timeline: the caller's speech starts 0.3 s into the stream, the agent's reply on the
    # right channel after it; both where the Twilio stand-in heard and sent them (within 0.25 s).
    caller_on = onset(pcm[:, 0], rate)
    agent_on = onset(pcm[:, 1], rate)
    reply_heard = timeline.replies()[0][0]
    assert abs(caller_on - 0.3) < 0.25
    assert abs(agent_on - reply_heard) < 0.35
    assert agent_on > 0.3 + len(speech) / 8000


@requires_espeak
@sip_tests.needs_sipp
async def test_a_sip_call_is_recorded_with_its_call_id_parties_key_and_bye(tmp_path, tiny_model):
    rtp = random.randrange(30000, 59000, 2)
    sip = f"{{enabled: true, host: 127.0.0.1, port: {sip_tests.free_port()}, rtp_ports: [{rtp}, {rtp + 99}], max_calls: 4}}"
    runtime = AgentRuntime(load_agent(sip_tests.agent_file(tmp_path, f"transports:\n  sip: {sip}{RECORDS}")), model=tiny_model)
    server = sip_server(runtime)
    await server.start()
    try:
        sip_tests.caller_speech(tmp_path, "Hello, I would like to check on my order please.")
        shutil.copy(sip_tests.DTMF_PCAP, tmp_path / "dtmf.pcap")
        await sip_tests.sipp("uac_speech_dtmf.xml", server.port, tmp_path)
        await sip_tests.all_ended(server.handler, 1)
    finally:
        await server.stop()
        await server.handler.close()
    await runtime.close()
    ((call_id, _reason, _rtp),) = server.handler.finished
    store = open_store(runtime.records.config.database)
    try:
        (info,) = store.list_calls()
        info, events = store.get_call(info.call_id)
    finally:
        store.close()
    assert info.transport == "sip" and info.transport_ids["sip_call_id"] == call_id
    assert info.caller.startswith("sip:caller@") and info.callee.startswith("sip:agent@")
    assert info.end_reason == "caller_hung_up"
    assert [e.data["key"] for e in events if e.kind == "keypad"] == ["5"]
    assert "caller_turn_started" in [e.kind for e in events]
    rate, pcm = stereo(info.recording)
    # from the caller's first RTP packet (shortly after the answer) to the hang-up
    assert rate == 8000 and -1.5 < len(pcm) / rate - (info.ended_at - info.answered_at) < 0.3
    assert np.abs(pcm[:, 0]).max() > 1000
    # the agent's side holds its reply when the record says it replied (under load the caller may hang
    # up before the end of their turn is detected)
    assert (np.abs(pcm[:, 1]).max() > 1000) == ("agent_reply" in [e.kind for e in events])


async def test_a_twilio_call_refused_as_busy_is_a_record_ending_busy(tmp_path, tiny_model):
    path = twilio_agent_file(tmp_path, max_calls=1)
    runtime = AgentRuntime(load_agent(path), model=tiny_model)
    runtime.engine_status = lambda: {"behind_real_time": True}
    async with serving(create_app(runtime, public_url=PUBLIC)) as host:
        from agent.testing.twilio_caller import fetch_voice_twiml, sid

        call_sid = sid("CA")
        r = await fetch_voice_twiml(
            f"http://{host}", TOKEN, public_base=PUBLIC, form={"CallSid": call_sid, "From": "+15550002222", "To": "+15559990000"}
        )
        assert "<Reject" in r.text
        await runtime.records.start()
        await runtime.close()
    store = open_store(runtime.records.config.database)
    try:
        (info,) = store.list_calls(ended_by="busy")
    finally:
        store.close()
    assert info.transport_ids == {"call_sid": call_sid}
    assert (info.caller, info.callee, info.end_detail) == ("+15550002222", "+15559990000", "engine behind real time")


async def test_the_calls_view_needs_the_token_when_the_server_listens_beyond_loopback(tmp_path, tiny_model, monkeypatch):
    runtime = AgentRuntime(load_agent(twilio_agent_file(tmp_path)), model=tiny_model)
    runtime.record_refusal("webrtc", "at capacity")
    app = create_app(runtime, public_url=PUBLIC)
    app.state.listen_host = "0.0.0.0"
    monkeypatch.setenv("CHROMA_AGENTS_ADMIN_TOKEN", "s3cret")
    await runtime.records.start()
    for _ in range(100):
        if runtime.records.writer.pending == 0:
            break
        await asyncio.sleep(0.02)
    async with serving(app) as host, httpx.AsyncClient(base_url=f"http://{host}") as http:
        assert (await http.get("/api/calls")).status_code == 401
        assert (await http.get("/api/calls", params={"token": "wrong"})).status_code == 401
        ok = await http.get("/api/calls", headers={"Authorization": "Bearer s3cret"})
        (call,) = ok.json()["calls"]
        assert call["end_reason"] == "busy"
        assert (await http.get(f"/api/calls/{call['call_id']}/recording", params={"token": "s3cret"})).status_code == 404
        assert (await http.get("/api/calls/nope", params={"token": "s3cret"})).status_code == 404
        assert (await http.get("/api/calls", params={"token": "s3cret", "ended_by": "x"})).status_code == 400
    await runtime.close()



async def test_a_sip_invite_refused_as_busy_is_a_record_ending_busy(tmp_path, tiny_model):
    runtime = AgentRuntime(load_agent(sip_tests.agent_file(tmp_path, "max_sessions: 1\n")), model=tiny_model)
    runtime.engine_status = lambda: {"behind_real_time": True}
    spec = runtime.spec.transports.sip.model_copy(update={"enabled": True, "port": 0})
    server = sip_server(runtime, spec)
    await server.start()
    await runtime.records.start()
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    me = sock.getsockname()[1]
    try:
        invite = sip_tests._request("INVITE", server.port, "busy-1", body=sip_tests._offer(sip_tests.free_port()), me=me)
        await loop.sock_sendto(sock, invite, ("127.0.0.1", server.port))
        while not (data := await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)).startswith(b"SIP/2.0 486"):
            assert int(data.split(b" ", 2)[1]) < 200, data[:80]
    finally:
        sock.close()
        await server.stop()
        await server.handler.close()
    await runtime.close()
    store = open_store(runtime.records.config.database)
    try:
        (info,) = store.list_calls()
    finally:
        store.close()
    assert (info.transport, info.end_reason, info.transport_ids) == ("sip", "busy", {"sip_call_id": "busy-1"})
    assert info.caller == "sip:+15550001111@127.0.0.1" and "engine behind real time" in info.end_detail
