"""Person or answering machine, on committed espeak-ng recordings (tests/fixtures/answering/make.sh) run
through the call's VAD (webrtcvad with the agent file's defaults), 20 ms at a time as a call feeds them.
The margins written beside the assertions were measured on these files."""

from pathlib import Path

import numpy as np
import pytest
from pipecat.audio.vad.vad_analyzer import VADState

from processors.answering import (
    BEEP_MAX_SECS,
    HUMAN_PAUSE_SECS,
    MACHINE_SPEECH_SECS,
    SILENT_SECS,
    Answered,
    AnsweringDetector,
    Beep,
)
from processors.audio_io import read_audio, to_pcm16
from processors.vad import make_vad_analyzer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "answering"


def recording(name: str, rate: int = 8000) -> np.ndarray:
    return to_pcm16(read_audio(FIXTURES / name, rate))


def tone(hz: float | tuple[float, ...], seconds: float, rate: int = 8000, level: float = 0.4) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    freqs = hz if isinstance(hz, tuple) else (hz,)
    wave_ = sum(np.sin(2 * np.pi * f * t) for f in freqs) / len(freqs)
    return to_pcm16(wave_ * level)


def quiet(seconds: float, rate: int = 8000) -> np.ndarray:
    return np.zeros(round(seconds * rate), np.int16)


async def detect(pcm: np.ndarray, rate: int = 8000) -> tuple[Answered | None, list[Beep]]:
    vad = make_vad_analyzer("webrtc", sample_rate=rate)
    vad.set_sample_rate(rate)
    detector = AnsweringDetector(rate)
    frame = rate // 50
    beeps = []
    for start in range(0, pcm.size - frame + 1, frame):
        chunk = pcm[start : start + frame]
        state = await vad.analyze_audio(chunk.tobytes())
        for event in detector.feed(chunk, state in (VADState.STARTING, VADState.SPEAKING)):
            if isinstance(event, Beep):
                beeps.append(event)
    return detector.decision, beeps


async def test_a_short_hello_then_a_pause_is_a_person():
    decision, _ = await detect(recording("human_hello.wav"))
    assert decision.by == "human"
    # "Hello?" is 0.5 s of speech from 0.3 s: decided one pause later (measured 1.64 s).
    assert decision.greeting_secs == pytest.approx(0.5, abs=0.2)
    assert 0.8 + HUMAN_PAUSE_SECS <= decision.at <= 2.2


async def test_a_person_who_says_their_name_is_still_a_person():
    decision, _ = await detect(recording("human_intro.wav"))
    assert decision.by == "human"
    # 1.76 s of speech measured: 0.64 s short of MACHINE_SPEECH_SECS.
    assert decision.greeting_secs <= MACHINE_SPEECH_SECS - 0.4


@pytest.mark.parametrize("rate", [8000, 16000])
async def test_a_long_greeting_is_a_machine_and_its_beep_is_heard(rate):
    decision, beeps = await detect(recording("machine_beep.wav", rate), rate)
    assert decision.by == "machine"
    # Speech starts at 0.3 s: decided once MACHINE_SPEECH_SECS of it is heard (measured 2.74 s), long
    # before the 7.9 s greeting ends.
    assert MACHINE_SPEECH_SECS <= decision.at <= MACHINE_SPEECH_SECS + 0.8
    # The beep: 1 kHz for 0.5 s ending at 9.2 s into the recording.
    assert len(beeps) == 1
    assert beeps[0].hz == pytest.approx(1000, abs=30)
    assert beeps[0].secs == pytest.approx(0.5, abs=0.06)
    assert beeps[0].at == pytest.approx(9.2, abs=0.06)


async def test_a_beep_alone_is_a_machine():
    decision, beeps = await detect(np.concatenate([quiet(1.0), tone(1400, 0.3), quiet(1.0)]))
    assert decision.by == "machine" and "beep" in decision.reason
    assert beeps[0].hz == pytest.approx(1400, abs=30)


async def test_tones_that_are_not_beeps():
    # Held too long (a fax, a stuck tone), and two tones at once (North American ringback, 440 + 480 Hz).
    for pcm in (tone(1000, BEEP_MAX_SECS + 1.0), tone((440.0, 480.0), 0.5), tone(1000, 0.05)):
        _, beeps = await detect(np.concatenate([quiet(0.5), pcm, quiet(1.0)]))
        assert beeps == []


async def test_nothing_said_is_not_known():
    decision, _ = await detect(quiet(SILENT_SECS + 1))
    assert decision.by == "unknown"
    assert decision.at == pytest.approx(SILENT_SECS, abs=0.03)


def test_only_phone_and_listening_rates():
    with pytest.raises(ValueError, match="expected 8000 or 16000"):
        AnsweringDetector(44100)
