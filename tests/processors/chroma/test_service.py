"""ChromaS2SService as a pipecat processor: what it consumes and what it pushes for one turn."""

import numpy as np
from pipecat.frames.frames import (
    InputAudioRawFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMMessagesAppendFrame,
    LLMTextFrame,
    MetricsFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import ProcessingMetricsData, TTFBMetricsData
from pipecat.pipeline.worker import PipelineParams
from pipecat.tests.utils import SleepFrame, run_test

from processors.chroma.service import ChromaS2SService, pcm16

FRAME = 1920  # 24 kHz samples per 80 ms frame


def caller_frames(seconds: float, rate: int) -> list[InputAudioRawFrame]:
    rng = np.random.default_rng(5)
    audio = (rng.standard_normal(int(seconds * rate)) * 3000).astype(np.int16)
    step = rate // 50
    return [
        InputAudioRawFrame(audio=audio[i : i + step].tobytes(), sample_rate=rate, num_channels=1)
        for i in range(0, audio.size, step)
    ]


async def test_a_user_turn_becomes_one_streamed_spoken_reply(tiny, voice):
    session = tiny.new_session(voice, "You are helpful.", max_frames=10, chunk_frames=2)
    service = ChromaS2SService(session)
    frames = [UserStartedSpeakingFrame(), *caller_frames(1.0, 8000), UserStoppedSpeakingFrame(), SleepFrame(2.0)]
    down, _ = await run_test(service, frames_to_send=frames, pipeline_params=PipelineParams(enable_metrics=True))

    assert not any(isinstance(f, InputAudioRawFrame) for f in down)  # caller audio is consumed
    kinds = [type(f) for f in down]
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert audio and all(f.sample_rate == 24000 and f.num_channels == 1 for f in audio)
    first_audio, last_audio = kinds.index(TTSAudioRawFrame), len(kinds) - 1 - kinds[::-1].index(TTSAudioRawFrame)
    assert kinds.index(LLMFullResponseStartFrame) < kinds.index(TTSStartedFrame) < first_audio
    assert last_audio < kinds.index(TTSStoppedFrame) < kinds.index(LLMFullResponseEndFrame)
    # Whole frames, at most the cap; the turn's text arrives as text frames and matches the session's.
    samples = sum(len(f.audio) // 2 for f in audio)
    assert samples % FRAME == 0 and 0 < samples // FRAME <= 10
    spoken = "".join(f.text for f in down if isinstance(f, TTSTextFrame))
    assert spoken == "".join(f.text for f in down if isinstance(f, LLMTextFrame))
    assert spoken == session.kept_text
    # pipecat metrics: time to first byte and processing time for the turn.
    data = [d for f in down if isinstance(f, MetricsFrame) for d in f.data]
    assert any(isinstance(d, TTFBMetricsData) and 0 < d.value < 5 for d in data)
    assert any(isinstance(d, ProcessingMetricsData) and 0 < d.value < 5 for d in data)


async def test_system_messages_become_instructions_for_the_next_turn(tiny, voice):
    session = tiny.new_session(voice, "You are helpful.")
    service = ChromaS2SService(session)
    task = {"role": "system", "content": "Ask for the order number."}
    chat = {"role": "user", "content": "ignored: the model hears audio"}
    await run_test(service, frames_to_send=[LLMMessagesAppendFrame(messages=[task, chat])])
    expected = session.layout.system("You are helpful.") + session.layout.system("Ask for the order number.")
    assert session.pending_ids == expected


async def test_a_turn_past_its_cap_is_cut_and_reported_once(tiny, voice):
    service = ChromaS2SService(tiny.new_session(voice, max_frames=2), max_turn_secs=0.2)
    dropped = []

    @service.event_handler("on_input_dropped")
    async def _dropped(_service, reason):
        dropped.append(reason)

    heard = []
    original = service.session.respond

    def respond(audio, say=None):
        heard.append(audio.size)
        return original(audio)

    service.session.respond = respond
    frames = [UserStartedSpeakingFrame(), *caller_frames(1.0, 16000), UserStoppedSpeakingFrame(), SleepFrame(1.0)]
    await run_test(service, frames_to_send=frames)
    assert dropped == ["turn_too_long"]
    assert heard and heard[0] <= int(0.2 * 16000) + 320  # the cap, plus the frame that crossed it


def test_reply_audio_leaves_as_int16_rounded_to_nearest_on_the_32768_scale():
    # The same conversion as processors.audio_io.to_pcm16: full scale is 32768, rounded, clipped.
    audio = np.array([0.5, -0.5, 1.0, -1.0, 1.6 / 32768, -1.4 / 32768, 2.0, -2.0], np.float32)
    assert np.frombuffer(pcm16(audio), "<i2").tolist() == [16384, -16384, 32767, -32768, 2, -1, 32767, -32768]
