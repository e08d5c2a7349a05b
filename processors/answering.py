"""Who answered an outbound call: a person or an answering machine, from the first seconds of audio.

A person picks up and says something short ("Hello?", "Sam speaking") and then waits for an answer.
A machine plays a recorded greeting: seconds of speech with only short pauses, usually ending in a
beep, a pure tone near 1 kHz held for a fraction of a second.

    detector = AnsweringDetector(8000)
    for pcm, speech in frames:                # 20 ms of int16 PCM, and whether the call's VAD hears speech
        for event in detector.feed(pcm, speech):
            ...                                # Answered("human"|"machine"|"unknown", ...) once; Beep(...)

`AnsweringGate` is the pipeline's side: placed right after the transport's input, it holds the
callee's audio back from the agent until the detector decides. A person's greeting is then passed on
(so the agent answers it, as people expect after their "Hello?"); a machine's never reaches the agent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADState
from pipecat.frames.frames import Frame, InputAudioRawFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from processors.audio_io import to_float

# Greetings. Measured through webrtcvad on espeak-ng recordings (tests/fixtures/answering): "Hello?"
# 0.5 s of speech, "Hello, this is Sam speaking." 1.76 s; the machine's greeting 7.9 s with pauses of
# at most 0.56 s between words.
MACHINE_SPEECH_SECS = 2.4  # speech this long, short pauses bridged, is a recorded greeting
WORD_GAP_SECS = 0.5  # a pause shorter than this is between words of one greeting
HUMAN_PAUSE_SECS = 0.8  # after a short greeting a person stops and waits this long, or longer
SILENT_SECS = 5.0  # nothing said for this long after the answer: not known

# The beep: one steady tone in this band, nearly all the energy at one frequency, held this long.
BEEP_BAND_HZ = (500.0, 2500.0)
BEEP_MIN_SECS = 0.15
BEEP_MAX_SECS = 1.5
# Share of a 40 ms window's energy around its strongest bin. Measured: espeak-ng speech (tonal vowels,
# the worst case) at most 0.81, a sine beep 0.999+ (tests/fixtures/answering).
BEEP_PEAK_SHARE = 0.9
BEEP_MIN_LEVEL_DBFS = -40.0
BEEP_WINDOW_SECS = 0.04


@dataclass(frozen=True)
class Answered:
    """The decision. `at`: seconds of the callee's audio it took; `greeting_secs`: the speech heard."""

    by: str  # "human", "machine" or "unknown" (nothing said)
    at: float
    greeting_secs: float
    reason: str


@dataclass(frozen=True)
class Beep:
    """A beep that has ended: when (seconds into the callee's audio), its frequency and length."""

    at: float
    hz: float
    secs: float


class BeepDetector:
    """Finds a steady single tone held BEEP_MIN_SECS..BEEP_MAX_SECS, reported once it stops."""

    def __init__(self, rate: int):
        self.rate = rate
        self._window = np.hanning(round(rate * BEEP_WINDOW_SECS)).astype(np.float32)
        self._recent = np.zeros(0, np.float32)
        self._tone_hz: float | None = None
        self._tone_secs = 0.0

    def feed(self, pcm: np.ndarray, now: float) -> Beep | None:
        """`pcm`: the next int16 frame; `now`: seconds at its end. A Beep when a tone just ended."""
        frame_secs = pcm.size / self.rate
        self._recent = np.concatenate([self._recent, to_float(pcm)])[-self._window.size :]
        hz = self._tone(self._recent) if self._recent.size == self._window.size else None
        steady = hz is not None and (self._tone_hz is None or abs(hz - self._tone_hz) <= 60.0)
        if steady:
            self._tone_hz = hz if self._tone_hz is None else self._tone_hz
            self._tone_secs += frame_secs
            return None
        beep = None
        if self._tone_hz is not None and BEEP_MIN_SECS <= self._tone_secs <= BEEP_MAX_SECS:
            beep = Beep(
                at=round(now - frame_secs, 3), hz=round(self._tone_hz), secs=round(self._tone_secs, 3)
            )
        self._tone_hz = hz
        self._tone_secs = frame_secs if hz is not None else 0.0
        return beep

    def _tone(self, samples: np.ndarray) -> float | None:
        """The frequency of the window's single steady tone, or None."""
        if 10 * np.log10(float(np.mean(samples**2)) + 1e-12) < BEEP_MIN_LEVEL_DBFS:
            return None
        power = np.abs(np.fft.rfft(samples * self._window)) ** 2
        peak = int(np.argmax(power))
        share = float(power[max(0, peak - 2) : peak + 3].sum()) / float(power.sum())
        hz = peak * self.rate / samples.size
        if share < BEEP_PEAK_SHARE or not BEEP_BAND_HZ[0] <= hz <= BEEP_BAND_HZ[1]:
            return None
        return hz


class AnsweringDetector:
    """Person or machine, from 20 ms frames of PCM (8 or 16 kHz) and the VAD's verdict on each."""

    def __init__(self, rate: int):
        if rate not in (8000, 16000):
            raise ValueError(f"rate {rate} Hz is not supported; expected 8000 or 16000")
        self.rate = rate
        self.beeps = BeepDetector(rate)
        self.decision: Answered | None = None
        self.now = 0.0  # seconds of audio fed
        self.speech_secs = 0.0  # speech in the greeting so far, short pauses bridged
        self.silence_secs = 0.0  # the current run of non-speech
        self._started: float | None = None  # when the greeting's speech began

    def feed(self, pcm: np.ndarray, speech: bool) -> list[Answered | Beep]:
        frame_secs = pcm.size / self.rate
        self.now += frame_secs
        events: list[Answered | Beep] = []
        beep = self.beeps.feed(pcm, self.now)
        if beep is not None:
            events.append(beep)
            self._decide(events, "machine", f"a {beep.hz:.0f} Hz beep of {beep.secs:.2f} s")
        if speech:
            if self._started is None:
                self._started = self.now - frame_secs
            elif self.silence_secs < WORD_GAP_SECS:
                self.speech_secs += self.silence_secs  # a pause between words counts with the greeting
            self.speech_secs += frame_secs
            self.silence_secs = 0.0
        else:
            self.silence_secs += frame_secs
        if self.speech_secs >= MACHINE_SPEECH_SECS:
            self._decide(events, "machine", f"{self.speech_secs:.1f} s of speech without a pause")
        elif self._started is not None and self.silence_secs >= HUMAN_PAUSE_SECS:
            self._decide(
                events, "human", f"{self.speech_secs:.1f} s greeting, then {self.silence_secs:.1f} s pause"
            )
        elif self._started is None and self.now >= SILENT_SECS:
            self._decide(events, "unknown", f"nothing said in {self.now:.1f} s")
        return events

    def _decide(self, events: list, by: str, reason: str) -> None:
        if self.decision is None:
            self.decision = Answered(by, round(self.now, 3), round(self.speech_secs, 3), reason)
            events.append(self.decision)


class AnsweringGate(FrameProcessor):
    """Holds the callee's audio back from the agent until `AnsweringDetector` decides.

    human / unknown: the held audio goes on, then everything after it (the agent answers the greeting).
    machine: no audio of the callee reaches the agent again; the detector goes on listening for the beep.
    `on_event` is awaited with each Answered and Beep (the caller's policy: note it, hang up, speak).
    """

    def __init__(
        self,
        vad: VADAnalyzer,
        on_event: Callable[[Answered | Beep], Awaitable[None]],
        *,
        name: str | None = None,
    ):
        super().__init__(name=name)
        self._vad = vad
        self._on_event = on_event
        self._detector: AnsweringDetector | None = None
        self._held: list[InputAudioRawFrame] = []
        self.passing = False

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            await self._listen(frame)
            return
        await self.push_frame(frame, direction)

    async def _listen(self, frame: InputAudioRawFrame) -> None:
        if self.passing:
            await self.push_frame(frame)
            return
        if self._detector is None:
            self._detector = AnsweringDetector(frame.sample_rate)
            self._vad.set_sample_rate(frame.sample_rate)
        state = await self._vad.analyze_audio(frame.audio)
        speech = state in (VADState.STARTING, VADState.SPEAKING)
        decided = self._detector.decision is not None
        if not decided:
            self._held.append(frame)
        for event in self._detector.feed(np.frombuffer(frame.audio, dtype=np.int16), speech):
            await self._on_event(event)
            if isinstance(event, Answered) and event.by != "machine":
                self.passing = True
                held, self._held = self._held, []
                for earlier in held:
                    await self.push_frame(earlier)
        if self._detector.decision is not None and not self.passing:
            self._held = []
