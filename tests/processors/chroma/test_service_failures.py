"""A reply the model fails on: the caller hears the pre-rendered apology, not silence, and after
`hang_up_after` failures in a row the goodbye, and the call ends.

The session here stands in for a failing engine, which the tiny model cannot be made to be on cue."""

from types import SimpleNamespace

import numpy as np
from pipecat.frames.frames import (
    EndWorkerFrame,
    LLMFullResponseEndFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.tests.utils import SleepFrame, run_test

from processors.audio import StreamResampler
from processors.chroma.service import ChromaS2SService, ModelErrorAudio, pcm16, render_line
from processors.chroma.session import AudioChunk
from tests.processors.chroma.test_service import caller_frames

FRAME = 1920  # 24 kHz samples per 80 ms frame
APOLOGY = pcm16(np.linspace(-0.5, 0.5, 5 * FRAME, dtype=np.float32))
GOODBYE = pcm16(np.linspace(0.3, -0.3, 7 * FRAME, dtype=np.float32))
REPLY_SAMPLE = 0.25  # the stand-in reply's audio: a constant, told apart from both lines


class FailingSession:
    """Yields `chunks_before_failing` two-frame chunks of each reply, then raises as a broken engine would;
    `fails`: whether each reply in turn fails (default: all of them)."""

    def __init__(self, chunks_before_failing: int, fails: list[bool] | None = None):
        self.model = SimpleNamespace(source="stand-in")
        self.system_prompt = ""
        self.on_tool_call = None
        self.kept_text = ""
        self.chunks_before_failing = chunks_before_failing
        self.fails = fails
        self.replies = 0

    async def respond(self, user_audio=None, *, say=None):
        fail = self.fails is None or self.fails[self.replies]
        self.replies += 1
        for i in range(self.chunks_before_failing):
            audio = np.full(2 * FRAME, REPLY_SAMPLE, np.float32)
            yield AudioChunk(audio=audio, frames=(2 * i, 2 * i + 2), text_tokens=[], text="", codes=None)
        if fail:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def cancel(self): ...
    def heard(self, frames): ...
    def instruct(self, text): ...
    def set_tools(self, tools): ...


def caller_turn() -> list:
    return [UserStartedSpeakingFrame(), *caller_frames(0.3, 16000), UserStoppedSpeakingFrame(), SleepFrame(0.3)]


def audio_of(frames) -> bytes:
    return b"".join(f.audio for f in frames if isinstance(f, TTSAudioRawFrame))


def failures_seen(service) -> list:
    seen = []

    @service.event_handler("on_turn_failed")
    async def _failed(_service, error, in_row, hanging_up):
        seen.append((type(error).__name__, in_row, hanging_up))

    return seen


async def test_a_reply_that_fails_at_its_start_plays_the_apology_in_its_place():
    service = ChromaS2SService(FailingSession(0), model_error=ModelErrorAudio(APOLOGY, GOODBYE, hang_up_after=3))
    seen = failures_seen(service)
    down, _ = await run_test(service, frames_to_send=caller_turn())

    assert audio_of(down) == APOLOGY
    kinds = [type(f) for f in down]
    assert kinds.index(TTSStartedFrame) < kinds.index(TTSAudioRawFrame)
    assert kinds.index(TTSStoppedFrame) < kinds.index(LLMFullResponseEndFrame)
    assert seen == [("RuntimeError", 1, False)]
    assert EndWorkerFrame not in kinds  # one failure does not end the call


async def test_a_reply_that_fails_midway_goes_on_with_the_apology_at_the_output_rate():
    service = ChromaS2SService(
        FailingSession(2), out_rate=8000, model_error=ModelErrorAudio(APOLOGY, GOODBYE, hang_up_after=3)
    )
    seen = failures_seen(service)
    down, _ = await run_test(service, frames_to_send=caller_turn())

    # The two chunks the caller heard, then the apology, through the reply's own resampler to 8 kHz.
    resampler = StreamResampler(24000, 8000)
    chunk = pcm16(np.full(2 * FRAME, REPLY_SAMPLE, np.float32))
    expected = resampler.process(chunk) + resampler.process(chunk)
    for start in range(0, len(APOLOGY), 4 * FRAME):
        expected += resampler.process(APOLOGY[start : start + 4 * FRAME])
    assert audio_of(down) == expected + resampler.flush()
    assert all(f.sample_rate == 8000 for f in down if isinstance(f, TTSAudioRawFrame))
    kinds = [type(f) for f in down]
    assert kinds.count(TTSStartedFrame) == 1 and kinds.count(TTSStoppedFrame) == 1
    assert seen == [("RuntimeError", 1, False)]


async def test_failures_in_a_row_end_the_call_with_the_goodbye_and_a_success_resets_the_count():
    # fail, fail, succeed (the count starts again), fail, fail, fail: the sixth reply ends the call.
    session = FailingSession(1, fails=[True, True, False, True, True, True])
    service = ChromaS2SService(session, model_error=ModelErrorAudio(APOLOGY, GOODBYE, hang_up_after=3))
    seen = failures_seen(service)
    down, _ = await run_test(service, frames_to_send=caller_turn() * 6)

    assert [s[1:] for s in seen] == [(1, False), (2, False), (1, False), (2, False), (3, True)]
    reply = pcm16(np.full(2 * FRAME, REPLY_SAMPLE, np.float32))
    # Each reply's chunk; the apology after each failure; the goodbye (not the apology) after the third.
    assert audio_of(down) == (reply + APOLOGY) * 2 + reply + (reply + APOLOGY) * 2 + reply + GOODBYE
    kinds = [type(f) for f in down]
    last_audio = len(kinds) - 1 - kinds[::-1].index(TTSAudioRawFrame)
    assert kinds.count(EndWorkerFrame) == 1 and kinds.index(EndWorkerFrame) > last_audio


async def test_without_rendered_lines_a_failed_reply_is_reported_and_silent():
    service = ChromaS2SService(FailingSession(0))
    seen = failures_seen(service)
    down, _ = await run_test(service, frames_to_send=caller_turn() + caller_turn() + caller_turn() + caller_turn())
    assert audio_of(down) == b""
    assert TTSStartedFrame not in [type(f) for f in down]
    assert [s[1:] for s in seen] == [(1, False), (2, False), (3, False), (4, False)]


async def test_a_line_is_rendered_through_the_session_in_its_voice(tiny, voice):
    session = tiny.new_session(voice, "", max_frames=6, chunk_frames=2)
    pcm = await render_line(session, "Sorry, could you say that again?")
    assert pcm and len(pcm) % (2 * FRAME) == 0 and len(pcm) // (2 * FRAME) <= 6
    assert np.abs(np.frombuffer(pcm, np.int16)).max() > 0
