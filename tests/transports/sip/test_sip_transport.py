"""SipCallTransport: caller RTP in as 8 kHz frames and DTMF frames, agent audio out as paced RTP,
barge-in silencing our RTP within one packet, native DTMF out, a whole call on the tiny model; and
SipCalls, the glue from SIP dialogs to calls (ports, offers and re-offers, hang-ups, silence timeout)."""

import asyncio
import random
import time
from types import SimpleNamespace

import numpy as np
import pytest
from aiortc.rtp import RtpPacket
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.frames.frames import (
    InputDTMFFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputDTMFUrgentFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.workers.runner import WorkerRunner

from agent.lines.sip import SipCalls, SipConfigError, sip_server
from agent.metrics import ServerMetrics
from agent.runtime import AgentRuntime
from agent.spec import SIPTransportSpec, load_agent
from processors.audio import ulaw_decode, ulaw_encode
from tests.agent.test_sip_call import agent_file
from tests.speech import requires_espeak, synthesize
from tests.transports.sip.test_rtp import HOST, TONE, is_tone, offer, peer, pool, wait_for
from transports.sip.dialog import CallRejected
from transports.sip.dtmf import DtmfEvent, dtmf_packets
from transports.sip.rtp import RtpSession
from transports.sip.sdp import SdpError, negotiate
from transports.sip.transport import SipCallTransport


class FrameLog(BaseObserver):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.frames = []

    async def on_push_frame(self, data: FramePushed):
        if isinstance(data.frame, self.kind) and data.frame not in self.frames:
            self.frames.append(data.frame)


async def connected_transport():
    far = await peer()
    session = await RtpSession.open(pool(), name="test")
    session.configure(negotiate(offer(far.port), local_ip=HOST, local_port=session.port))
    session.start()
    return SipCallTransport(session, name="sip-test"), session, far


async def run_bare(transport):
    """Just the transport's two ends, so a test can put frames in directly."""
    worker = PipelineWorker(
        Pipeline([transport.input(), transport.output()]),
        params=PipelineParams(audio_in_sample_rate=8000, audio_out_sample_rate=8000),
        enable_turn_tracking=False,
        enable_rtvi=False,
        idle_timeout_secs=None,
    )
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    return worker, asyncio.create_task(runner.run())


async def stop(worker, task, session):
    await worker.cancel()
    await asyncio.wait_for(task, 10)
    session.close()


async def test_interruption_drops_queued_audio_so_our_rtp_goes_silent_within_one_packet():
    transport, session, far = await connected_transport()
    worker, task = await run_bare(transport)
    try:
        await worker.queue_frame(OutputAudioRawFrame(audio=TONE * 150, sample_rate=8000, num_channels=1))
        await wait_for(lambda: sum(is_tone(p) for _, p in far.packets) >= 10, timeout=5)
        # Real-time playback: the pipeline is never more than about a packet ahead of the wire.
        assert session.queued_frames <= 2
        dropped_at, drop = [], session.drop_queued

        def timed_drop():
            dropped_at.append(time.monotonic())
            return drop()

        session.drop_queued = timed_drop
        await worker.queue_frame(InterruptionFrame())
        await wait_for(lambda: transport.output().unplayed_seconds() > 0, timeout=2)
        await asyncio.sleep(0.3)
    finally:
        await stop(worker, task, session)
    after = [p for t, p in far.packets if t > dropped_at[0]]
    assert sum(is_tone(p) for p in after) <= 1  # at most the packet already on its way
    assert len(after) >= 10 and not any(is_tone(p) for p in after[1:])
    assert transport.output().unplayed_seconds() <= 0.04


async def test_caller_audio_and_keys_come_in_as_frames_and_agent_keys_go_out_as_rfc4733():
    transport, session, far = await connected_transport()
    worker, task = await run_bare(transport)
    keys = FrameLog(InputDTMFFrame)
    worker.add_observer(keys)
    heard = []

    try:
        await wait_for(lambda: session.on_audio is not None, timeout=5)
        to_pipeline = session.on_audio

        async def record(pcm):
            heard.append(pcm)
            await to_pipeline(pcm)

        session.on_audio = record
        for seq in range(20):
            packet = RtpPacket(
                payload_type=0, sequence_number=seq, timestamp=seq * 160, ssrc=5, payload=ulaw_encode(TONE)
            )
            far.send(packet.serialize(), session.port)
        for packet in dtmf_packets("4", payload_type=101, ssrc=5, seq=20, timestamp=20 * 160):
            far.send(packet.serialize(), session.port)
        await wait_for(lambda: keys.frames, timeout=3)
        await wait_for(lambda: any(np.abs(np.frombuffer(p, np.int16)).max() > 1000 for p in heard), timeout=3)
        await worker.queue_frame(OutputDTMFUrgentFrame(button=KeypadEntry.NINE))
        await wait_for(lambda: any(p.payload_type == 101 for _, p in far.packets), timeout=3)
        await asyncio.sleep(0.2)
    finally:
        await stop(worker, task, session)
    assert [f.button for f in keys.frames] == [KeypadEntry.FOUR]
    assert all(len(p) == 320 for p in heard)
    events = [DtmfEvent.parse(p.payload) for _, p in far.packets if p.payload_type == 101]
    assert {e.digit for e in events} == {"9"} and events[-1].end


@requires_espeak
async def test_an_agent_call_over_rtp_answers_the_caller_with_audio(tmp_path, tiny_model):
    runtime = AgentRuntime(load_agent(agent_file(tmp_path)), model=tiny_model)
    transport, session, far = await connected_transport()
    call = runtime.new_call(transport, call_id="sip-rtp-1")
    running = asyncio.create_task(call.run())
    try:
        speech = ulaw_encode(synthesize("Hello, I would like to check on my order please.", 8000))
        start = time.monotonic()
        frames = [speech[i : i + 160].ljust(160, b"\xff") for i in range(0, len(speech), 160)]
        for seq, payload in enumerate(frames + [b"\xff" * 160] * 100):
            packet = RtpPacket(
                payload_type=0, sequence_number=seq, timestamp=seq * 160, ssrc=9, payload=payload
            )
            far.send(packet.serialize(), session.port)
            await asyncio.sleep(max(0.0, start + (seq + 1) * 0.02 - time.monotonic()))
            if call.stats.ttfa and seq > len(frames):
                break
        await wait_for(lambda: call.stats.ttfa, timeout=10)
        await asyncio.sleep(0.5)
    finally:
        await call.cancel("test over")
        await asyncio.wait_for(running, 10)
        session.close()
    assert call.stats.turns >= 1
    agent = [p for _, p in far.packets if p.payload_type == 0]
    levels = [np.abs(ulaw_decode(p.payload).astype(np.int32)).max() for p in agent]
    assert sum(level > 300 for level in levels) >= 5  # the tiny model's noise came back over RTP


# SipCalls, the glue from dialogs to calls, with stand-in dialogs and calls -------------------------


class FakeDialog:
    """What SipCalls uses of a Dialog; hang_up() ends the dialog the way the real server does."""

    def __init__(self, handler, call_id="fake-1", caller="sip:+15550001111@192.0.2.7"):
        self.handler, self.call_id = handler, call_id
        self.confirmed = self.ended = False
        self.hung_up = 0
        self.invite = SimpleNamespace(from_=SimpleNamespace(uri=caller), to=SimpleNamespace(uri="sip:agent@192.0.2.1"))
        self.referred = []

    async def refer(self, target):
        self.referred.append(target)
        return True

    async def hang_up(self):
        self.hung_up += 1
        self.ended = True
        await self.handler.end(self, "hangup")


class FakeCall:
    """Runs until cancelled, or for `lasts` seconds (then it has ended by itself, as on an EndFrame)."""

    def __init__(self, lasts=None):
        self.lasts, self.cancelled = lasts, None
        self._stop = asyncio.Event()
        self.flow_state = {}
        self.identity = None  # what the transport told the call's record

    def identify(self, transport_ids, *, caller=None, callee=None):
        self.identity = (transport_ids, caller, callee)

    async def run(self):
        try:
            await asyncio.wait_for(self._stop.wait(), self.lasts)
        except TimeoutError:
            pass

    async def cancel(self, reason=None):
        self.cancelled = reason
        self._stop.set()


class FakeRuntime:
    """What SipCalls uses of an AgentRuntime; its capacity is the real runtime's (one owner of it)."""

    max_sessions = 32
    engine_status = None
    draining = False
    busy_reason = AgentRuntime.busy_reason
    engine_state = AgentRuntime.engine_state
    reserve = AgentRuntime.reserve
    release = AgentRuntime.release
    sessions = AgentRuntime.sessions

    def __init__(self, lasts=None):
        self.calls, self.lasts, self.made, self.transports = {}, lasts, [], []
        self.reserved = set()
        self.metrics = ServerMetrics()
        self.refusals = []  # calls refused as busy, as kept in the records

    def record_refusal(self, transport, reason, **ids):
        self.refusals.append((transport, reason, ids))

    def new_call(self, transport, *, call_id):
        assert (transport.kind, transport.in_rate, transport.out_rate) == ("sip", 8000, 8000)
        assert isinstance(transport, SipCallTransport)
        self.made.append(FakeCall(self.lasts))
        self.transports.append(transport)
        return self.made[-1]


def sip_calls(runtime, pairs=4, **kwargs) -> SipCalls:
    first = random.randrange(30000, 59000, 2)
    spec = SIPTransportSpec(
        enabled=True, host=HOST, rtp_ports=(first, first + 2 * pairs - 1), codecs=["PCMU"]
    )
    return SipCalls(runtime, spec, **kwargs)


async def test_offer_answers_with_a_pool_port_and_503_when_the_pool_is_empty():
    far = await peer()
    calls = sip_calls(FakeRuntime(), pairs=1)
    first, second = FakeDialog(calls, "a"), FakeDialog(calls, "b")
    answer = (await calls.offer(first, offer(far.port).encode())).decode()
    port = calls.media[first].session.port
    assert f"m=audio {port} RTP/AVP 0 101" in answer and f"c=IN IP4 {HOST}" in answer
    with pytest.raises(CallRejected) as refused:
        await calls.offer(second, offer(far.port).encode())
    assert refused.value.status == 503
    await calls.end(first, "bye")
    await calls.end(first, "bye")  # once only
    assert calls.pool.in_use == set() and calls.media == {}
    await asyncio.sleep(0.01)  # asyncio closes a datagram socket on the loop's next turn
    with pytest.raises(SdpError):  # a codec we do not take: the server answers 488, nothing is held
        await calls.offer(second, offer(far.port, codec="PCMA").encode())
    assert calls.pool.in_use == set() and calls.media == {}


async def test_reinvite_puts_the_media_on_hold_and_back():
    far = await peer()
    calls = sip_calls(FakeRuntime())
    dialog = FakeDialog(calls)
    first = await calls.offer(dialog, offer(far.port).encode())
    dialog.confirmed = True
    held = (await calls.offer(dialog, offer(far.port, "sendonly").encode())).decode()
    session = calls.media[dialog].session
    assert "a=recvonly" in held and session.on_hold
    resumed = (await calls.offer(dialog, offer(far.port).encode())).decode()
    assert not session.on_hold and "a=sendrecv" in resumed
    assert _version(resumed) == _version(first.decode()) + 2  # o= version up by one per answer
    await calls.end(dialog, "bye")


def _version(sdp: str) -> int:
    return int(next(line for line in sdp.splitlines() if line.startswith("o=")).split()[2])


async def test_the_agent_ending_the_call_sends_bye_and_frees_the_ports():
    far = await peer()
    runtime = FakeRuntime(lasts=0.2)
    calls = sip_calls(runtime)
    dialog = FakeDialog(calls)
    await calls.offer(dialog, offer(far.port).encode())
    dialog.confirmed = True
    await calls.start(dialog)
    await wait_for(lambda: dialog.hung_up, timeout=3)
    assert dialog.hung_up == 1 and calls.media == {} and calls.pool.in_use == set()
    assert calls.finished[-1][:2] == ("fake-1", "hangup")
    assert runtime.made[0].cancelled is None  # it had ended by itself
    assert runtime.made[0].flow_state["caller_number"] == "+15550001111"  # the From's user, for the flow


async def test_a_transfer_asked_of_the_call_is_a_refer_on_its_dialog():
    far = await peer()
    runtime = FakeRuntime()
    calls = sip_calls(runtime)
    dialog = FakeDialog(calls, caller="tel:+15550001111")
    await calls.offer(dialog, offer(far.port).encode())
    await calls.start(dialog)
    transport = runtime.transports[0]
    assert await transport.transfer("sip:desk@pbx.example.com") is True
    assert dialog.referred == ["sip:desk@pbx.example.com"]
    assert runtime.made[0].flow_state["caller_number"] == ""  # a tel: From has no SIP user part
    await calls.end(dialog, "bye")
    await calls.close()


async def test_bye_cancels_the_running_call():
    far = await peer()
    runtime = FakeRuntime()
    calls = sip_calls(runtime)
    dialog = FakeDialog(calls)
    await calls.offer(dialog, offer(far.port).encode())
    await calls.start(dialog)
    await calls.end(dialog, "bye")
    await wait_for(lambda: runtime.made[0].cancelled, timeout=3)
    assert runtime.made[0].cancelled == "SIP bye" and dialog.hung_up == 0
    assert runtime.made[0].identity == ({"sip_call_id": "fake-1"}, "sip:+15550001111@192.0.2.7", "sip:agent@192.0.2.1")
    assert calls.pool.in_use == set()
    await calls.close()


async def test_a_silent_peer_is_hung_up_but_not_while_on_hold():
    far = await peer()
    runtime = FakeRuntime()
    calls = sip_calls(runtime, rtp_timeout=0.3)
    held, silent = FakeDialog(calls, "held"), FakeDialog(calls, "silent")
    await calls.offer(held, offer(far.port, "inactive").encode())
    await calls.offer(silent, offer(far.port).encode())
    await calls.start(held)
    await calls.start(silent)
    await wait_for(lambda: silent.hung_up, timeout=3)
    await asyncio.sleep(0.3)
    assert held.hung_up == 0 and held in calls.media
    assert runtime.made[1].cancelled == "no RTP"
    await calls.end(held, "bye")
    assert calls.pool.in_use == set()


def test_sip_server_needs_the_password_variable(monkeypatch):
    runtime = FakeRuntime()
    runtime.spec = None
    spec = SIPTransportSpec(
        enabled=True,
        auth={"realm": "example.com", "username": "trunk", "password_env": "TEST_SIP_PASSWORD_X"},
    )
    monkeypatch.delenv("TEST_SIP_PASSWORD_X", raising=False)
    with pytest.raises(SipConfigError, match="TEST_SIP_PASSWORD_X"):
        sip_server(runtime, spec)
    monkeypatch.setenv("TEST_SIP_PASSWORD_X", "secret")
    server = sip_server(runtime, spec)
    assert server.auth is not None and isinstance(server.handler, SipCalls)


@pytest.mark.parametrize(
    "change",
    [("m=audio {port}", "m=audio 70000"), ("m=audio {port}", "m=audio x"), ("c=IN IP4 127.0.0.1", "c=IN IP4 999.999.1.1")],
)
async def test_an_offer_we_cannot_send_to_is_refused_before_any_rtp_and_holds_nothing(change):
    far = await peer()
    runtime = FakeRuntime()
    calls = sip_calls(runtime)
    dialog = FakeDialog(calls)
    bad = offer(far.port).replace(change[0].format(port=far.port), change[1])
    assert bad != offer(far.port)
    with pytest.raises(SdpError):  # the server answers it 488
        await calls.offer(dialog, bad.encode())
    await asyncio.sleep(0.1)
    assert calls.media == {} and calls.pool.in_use == set() and runtime.reserved == set()
    assert far.packets == []


async def test_an_answered_call_holds_a_session_until_its_ack_and_beyond_max_sessions_is_486():
    far = await peer()
    runtime = FakeRuntime()
    runtime.max_sessions = 1
    calls = sip_calls(runtime)
    first, second = FakeDialog(calls, "a"), FakeDialog(calls, "b")
    await calls.offer(first, offer(far.port).encode())
    assert runtime.sessions == 1 and runtime.calls == {}  # answered, awaiting its ACK
    with pytest.raises(CallRejected) as refused:
        await calls.offer(second, offer(far.port).encode())
    assert refused.value.status == 486 and "max_sessions 1" in refused.value.reason
    assert second not in calls.media and len(calls.pool.in_use) == 1
    await calls.start(first)  # the ACK: the running call now holds the session, not the reservation
    assert runtime.reserved == set()
    await calls.end(first, "bye")
    await calls.close()


async def test_a_silent_peer_hung_up_is_counted_as_an_rtp_timeout():
    far = await peer()
    runtime = FakeRuntime()
    calls = sip_calls(runtime, rtp_timeout=0.3)
    dialog = FakeDialog(calls)
    await calls.offer(dialog, offer(far.port).encode())
    await calls.start(dialog)
    await wait_for(lambda: dialog.hung_up, timeout=3)
    assert runtime.metrics.sip_refusals == {"rtp_timeout": 1}
    await calls.close()
