"""TwilioCallTransport in a small real pipeline over an in-memory socket: pacing, marks, barge-in `clear`,
what reaches the pipeline from the caller, and how bad input is counted."""

import asyncio
import base64
import json
import time

import numpy as np
import pytest
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    InputAudioRawFrame,
    InputDTMFFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner
from starlette.websockets import WebSocketState

from processors.audio import ulaw_encode
from transports.twilio import CHUNK_SECS, LEAD_SECS, MARK_EVERY_CHUNKS, TwilioCallTransport
from transports.twilio_wire import TwilioStreamState

STREAM, CALL = "MZ" + "1" * 32, "CA" + "2" * 32


class FakeSocket:
    """The accepted WebSocket as the transport uses it, with a Twilio-like far end: media plays in real
    time from when it arrives, marks are echoed (if ``echo``) once the audio before them has played."""

    def __init__(self, echo: bool = True):
        self.application_state = WebSocketState.CONNECTED
        self.sent: list[tuple[float, dict]] = []
        self.incoming: asyncio.Queue = asyncio.Queue()
        self.echo = echo
        self.echoed: list[str] = []
        self._play_end = 0.0
        self._timers: list[asyncio.TimerHandle] = []

    async def send_text(self, text: str) -> None:
        now = time.monotonic()
        msg = json.loads(text)
        self.sent.append((now, msg))
        if msg["event"] == "media":
            self._play_end = max(self._play_end, now) + CHUNK_SECS
        elif msg["event"] == "mark" and self.echo:
            name = msg["mark"]["name"]
            delay = max(0.0, self._play_end - now)
            self._timers.append(asyncio.get_running_loop().call_later(delay, self._echo, name))
        elif msg["event"] == "clear":
            for timer in self._timers:
                timer.cancel()
            self._play_end = now

    def _echo(self, name: str) -> None:
        self.echoed.append(name)
        self.feed({"event": "mark", "sequenceNumber": "9", "streamSid": STREAM, "mark": {"name": name}})

    def feed(self, msg) -> None:
        text = msg if isinstance(msg, str) else json.dumps(msg)
        self.incoming.put_nowait({"type": "websocket.receive", "text": text})

    async def receive(self) -> dict:
        return await self.incoming.get()

    async def close(self, code: int = 1000) -> None:
        self.application_state = WebSocketState.DISCONNECTED
        self.incoming.put_nowait({"type": "websocket.disconnect", "code": code})

    def events(self, kind: str) -> list[tuple[float, dict]]:
        return [(t, m) for t, m in self.sent if m["event"] == kind]


class Collect(FrameProcessor):
    def __init__(self):
        super().__init__()
        self.frames: list[Frame] = []

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.frames.append(frame)
        await self.push_frame(frame, direction)


def started_state() -> TwilioStreamState:
    state = TwilioStreamState()
    state.receive(
        json.dumps(
            {
                "event": "start",
                "sequenceNumber": "1",
                "streamSid": STREAM,
                "start": {
                    "streamSid": STREAM,
                    "callSid": CALL,
                    "accountSid": "AC" + "3" * 32,
                    "tracks": ["inbound"],
                },
            }
        )
    )
    return state


class Harness:
    def __init__(self, socket: FakeSocket, **kw):
        self.socket = socket
        self.bad: list[str] = []
        self.transport = TwilioCallTransport(socket, started_state(), on_bad_input=self.bad.append, **kw)
        self.collect = Collect()
        self.left = asyncio.Event()

        @self.transport.event_handler("on_client_disconnected")
        async def _left(_t, _ws):
            self.left.set()

        pipeline = Pipeline([self.transport.input(), self.transport.output(), self.collect])
        self.worker = PipelineWorker(
            pipeline,
            params=PipelineParams(audio_in_sample_rate=8000, audio_out_sample_rate=8000),
            enable_turn_tracking=False,
            enable_rtvi=False,
            idle_timeout_secs=None,
        )

    async def __aenter__(self):
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(self.worker)
        self.task = asyncio.create_task(runner.run())
        await asyncio.sleep(0.2)
        return self

    async def __aexit__(self, *exc):
        if not self.task.done():
            await self.worker.cancel()
        await asyncio.wait_for(self.task, 10)

    async def speak(self, seconds: float):
        await self.worker.queue_frame(TTSStartedFrame())
        pcm = (np.sin(np.arange(int(8000 * seconds)) / 5) * 8000).astype(np.int16).tobytes()
        await self.worker.queue_frame(TTSAudioRawFrame(pcm, sample_rate=8000, num_channels=1))


async def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_audio_is_sent_at_most_the_lead_ahead_of_playback_and_every_piece_is_marked():
    socket = FakeSocket(echo=True)
    async with Harness(socket) as h:
        await h.speak(1.0)
        await h.worker.queue_frame(TTSStoppedFrame())
        await wait_for(
            lambda: len(socket.echoed) == len(socket.events("mark")) and len(socket.events("media")) == 50
        )
        await wait_for(lambda: any(isinstance(f, TTSStoppedFrame) for f in h.collect.frames))
    media = socket.events("media")
    t0 = media[0][0]
    for k, (t, _) in enumerate(media):
        queued_before = k * CHUNK_SECS - (t - t0)  # what Twilio still had to play when chunk k went out
        assert queued_before <= LEAD_SECS - CHUNK_SECS + 0.005, (k, queued_before)
    # A mark after every MARK_EVERY_CHUNKS chunks, and one closing the reply's last (partial) piece.
    kinds = [m["event"] for _, m in socket.sent if m["event"] in ("media", "mark")]
    assert kinds[: MARK_EVERY_CHUNKS + 1] == ["media"] * MARK_EVERY_CHUNKS + ["mark"]
    assert kinds[-1] == "mark"
    assert kinds.count("mark") == -(-50 // MARK_EVERY_CHUNKS)
    played = [f for f in h.collect.frames if isinstance(f, OutputAudioRawFrame)]
    assert len(played) == 50  # each written chunk is passed on for playout tracking
    assert h.transport.playout.unplayed_seconds() == 0.0


async def test_barge_in_clears_twilio_queue_sends_nothing_after_and_snapshots_unplayed_audio():
    socket = FakeSocket(echo=True)
    async with Harness(socket) as h:
        await h.speak(3.0)
        await wait_for(lambda: len(socket.echoed) >= 3)
        await h.worker.queue_frame(InterruptionFrame())
        await wait_for(lambda: socket.events("clear"))
        await asyncio.sleep(LEAD_SECS + 0.1)  # a chunk waiting on pacing would have gone out by now
        clear_at = socket.events("clear")[0][0]
        sent_before = [t for t, _ in socket.events("media") if t <= clear_at]
        assert len(socket.events("media")) == len(sent_before), "audio sent after the barge-in's clear"
        assert len(sent_before) < 150
        # Unplayed = audio sent minus the pieces whose marks came back before the clear.
        names = [m["mark"]["name"] for t, m in socket.events("mark") if t <= clear_at]
        echoed = [n for n in socket.echoed if n in names]
        echoed_chunks = MARK_EVERY_CHUNKS * len(echoed)
        expected = (len(sent_before) - echoed_chunks) * CHUNK_SECS
        assert h.transport.playout.unplayed_seconds() == pytest.approx(expected, abs=1e-6)
        assert 0 < expected <= LEAD_SECS + MARK_EVERY_CHUNKS * CHUNK_SECS + 1e-6


async def test_each_chunk_is_encoded_once_and_marks_carry_no_audio(monkeypatch):
    import transports.twilio as twilio
    import transports.twilio_wire as twilio_wire

    encoded = []

    def counting_encode(pcm):
        encoded.append(bytes(pcm))
        return ulaw_encode(pcm)

    monkeypatch.setattr(twilio, "ulaw_encode", counting_encode)
    # The wire module too, should it ever encode again (it builds marks).
    monkeypatch.setattr(twilio_wire, "ulaw_encode", counting_encode, raising=False)
    socket = FakeSocket(echo=True)
    async with Harness(socket) as h:
        await h.speak(0.5)
        await h.worker.queue_frame(TTSStoppedFrame())
        await wait_for(lambda: socket.events("mark") and len(socket.echoed) == len(socket.events("mark")))
    media = [base64.b64decode(m["media"]["payload"]) for _, m in socket.events("media")]
    # One encoding per chunk written, and what went out is exactly those encodings, nothing re-encoded.
    assert len(encoded) == len(media) == 25
    assert media == [ulaw_encode(chunk) for chunk in encoded]
    assert b"".join(encoded) == (np.sin(np.arange(4000) / 5) * 8000).astype(np.int16).tobytes()
    # Every message sent is a chunk or a mark naming the chunks before it: no throwaway media.
    assert {m["event"] for _, m in socket.sent} == {"media", "mark"}
    assert len(socket.events("mark")) == -(-25 // MARK_EVERY_CHUNKS)


async def test_interruption_with_nothing_queued_sends_no_clear():
    socket = FakeSocket(echo=True)
    async with Harness(socket) as h:
        await h.speak(0.16)
        await h.worker.queue_frame(TTSStoppedFrame())
        await wait_for(lambda: socket.events("mark") and len(socket.echoed) == len(socket.events("mark")))
        await h.worker.queue_frame(InterruptionFrame())
        await asyncio.sleep(0.2)
        assert socket.events("clear") == []
        assert h.transport.playout.unplayed_seconds() == 0.0


async def test_caller_audio_and_dtmf_reach_the_pipeline_past_bad_input_and_stop_ends_the_call():
    socket = FakeSocket()
    payload = base64.b64encode(b"\xff" * 160).decode()  # 20 ms of mu-law silence
    media = {
        "event": "media",
        "streamSid": STREAM,
        "media": {"chunk": "1", "timestamp": "0", "payload": payload},
    }
    async with Harness(socket) as h:
        socket.feed("{not json")
        socket.feed({"event": "nonsense", "streamSid": STREAM})
        socket.feed({**media, "media": {**media["media"], "payload": "!!!!"}})
        socket.feed({**media, "media": {**media["media"], "payload": "A" * 20000}})
        socket.feed({"event": "dtmf", "streamSid": STREAM, "dtmf": {"digit": "x"}})
        socket.feed(media)
        socket.feed({"event": "dtmf", "streamSid": STREAM, "dtmf": {"track": "inbound_track", "digit": "7"}})
        await wait_for(lambda: any(isinstance(f, InputDTMFFrame) for f in h.collect.frames))
        await wait_for(lambda: any(isinstance(f, InputAudioRawFrame) for f in h.collect.frames))
        assert not h.left.is_set()
        socket.feed({"event": "stop", "streamSid": STREAM, "stop": {"callSid": CALL}})
        await asyncio.wait_for(h.left.wait(), 5)
    assert h.bad == ["bad_json", "unknown_event", "bad_base64", "bad_payload_length", "bad_dtmf"]
    audio = next(f for f in h.collect.frames if isinstance(f, InputAudioRawFrame))
    assert (audio.sample_rate, audio.num_channels, len(audio.audio)) == (8000, 1, 320)
    assert [f.button.value for f in h.collect.frames if isinstance(f, InputDTMFFrame)] == ["7"]
    assert h.transport.caller_stopped


async def test_socket_gone_fires_disconnected():
    socket = FakeSocket()
    async with Harness(socket) as h:
        socket.incoming.put_nowait({"type": "websocket.disconnect", "code": 1006})
        await asyncio.wait_for(h.left.wait(), 5)
        assert not h.transport.caller_stopped


async def test_agent_end_without_account_sid_closes_the_socket_after_the_audio_played():
    socket = FakeSocket(echo=True)
    async with Harness(socket) as h:
        await h.speak(0.3)
        await h.worker.queue_frame(TTSStoppedFrame())
        await h.worker.queue_frame(EndFrame())
        await asyncio.wait_for(h.task, 10)
    assert socket.application_state == WebSocketState.DISCONNECTED
    assert socket.echoed == [m["mark"]["name"] for _, m in socket.events("mark")]


class RecordingRest:
    """A twilio Client's calls(sid).update(twiml=...) surface, recording what it was given."""

    def __init__(self):
        self.updates: list[tuple[str, str]] = []

    def calls(self, sid):
        rest = self

        class _Call:
            def update(self, twiml):
                rest.updates.append((sid, twiml))

        return _Call()


async def test_agent_end_hangs_up_over_rest_when_the_caller_is_still_there():
    socket, rest = FakeSocket(echo=True), RecordingRest()
    async with Harness(socket, rest_client=rest) as h:
        await h.worker.queue_frame(EndFrame())
        await asyncio.wait_for(h.task, 10)
    assert len(rest.updates) == 1 and rest.updates[0][0] == CALL and "<Hangup />" in rest.updates[0][1]
