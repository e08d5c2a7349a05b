"""A flow's telephony actions carried out on a call: what each one asks of the pipeline and transport."""

import wave
from types import SimpleNamespace

import numpy as np
import pytest
from pipecat.frames.frames import OutputAudioRawFrame, OutputDTMFUrgentFrame

from agent.call_control import PipelineCallControl, TransferNotSupported, read_wav
from flows.actions import CallControl


class FakeCall:
    def __init__(self, transport=None, out_rate=8000):
        self.frames, self.requests = [], []
        self.transport = transport or SimpleNamespace()
        self.stats = SimpleNamespace(kind="file", call_id="c1")
        self.service = SimpleNamespace(out_rate=out_rate, say=self._say)
        self.worker = SimpleNamespace(queue_frame=self._queue, queue_frames=self._queue_many)

    async def _say(self, text):
        self.requests.append(("say", text))

    async def _queue(self, frame):
        self.frames.append(frame)

    async def _queue_many(self, frames):
        self.frames.extend(frames)

    async def hang_up(self):
        self.requests.append(("hang_up",))

    async def cancel(self, reason=None):
        self.requests.append(("cancel", reason))

    async def set_voice(self, name):
        self.requests.append(("set_voice", name))


def test_it_is_a_call_control():
    assert isinstance(PipelineCallControl(FakeCall()), CallControl)


async def test_hang_up_after_the_sentence_ends_gracefully_and_at_once_cancels():
    call = FakeCall()
    control = PipelineCallControl(call)
    await control.hang_up()
    await control.hang_up(after_current_sentence=False)
    assert call.requests == [("hang_up",), ("cancel", "the flow hung up")]


async def test_transfer_goes_through_the_transport_and_fails_loudly_without_one():
    targets = []

    async def transfer(target):
        targets.append(target)
        return True

    await PipelineCallControl(FakeCall(SimpleNamespace(transfer=transfer))).transfer("sip:agent@pbx.example.com")
    assert targets == ["sip:agent@pbx.example.com"]
    with pytest.raises(TransferNotSupported):
        await PipelineCallControl(FakeCall()).transfer("+15551234567")

    async def refused(target):
        return False

    with pytest.raises(RuntimeError, match="refused"):
        await PipelineCallControl(FakeCall(SimpleNamespace(transfer=refused))).transfer("+15551234567")


async def test_dtmf_is_sent_as_one_urgent_frame():
    call = FakeCall()
    await PipelineCallControl(call).send_dtmf("12#*")
    (frame,) = call.frames
    assert isinstance(frame, OutputDTMFUrgentFrame) and frame.to_string() == "12#*"
    with pytest.raises(ValueError, match="cannot be sent"):
        await PipelineCallControl(call).send_dtmf("1A")


async def test_a_wav_is_played_at_the_calls_output_rate(tmp_path):
    path = tmp_path / "chime.wav"
    tone = (np.sin(np.arange(16000) / 16000 * 2 * np.pi * 440) * 8000).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.repeat(tone, 2).tobytes())
    assert read_wav(path)[1] == 16000 and read_wav(path)[0].size == 16000
    call = FakeCall(out_rate=8000)
    await PipelineCallControl(call).play(path)
    assert all(isinstance(f, OutputAudioRawFrame) and f.sample_rate == 8000 for f in call.frames)
    samples = sum(len(f.audio) for f in call.frames) // 2
    assert abs(samples - 8000) <= 2


async def test_say_and_voice_go_to_the_engine():
    call = FakeCall()
    control = PipelineCallControl(call)
    await control.say("Please hold.")
    await control.set_voice("specialist")
    assert call.requests == [("say", "Please hold."), ("set_voice", "specialist")]
