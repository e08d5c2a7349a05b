"""Shared pieces of the pipeline benchmark: constants, statistics, the stand-in engine, agent files, speech."""

from __future__ import annotations

import hashlib
import math
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from processors.chroma.rates import FRAME_SECONDS, SAMPLE_RATE  # what the stand-in engine speaks

ROOT = Path(__file__).resolve().parents[2]
BASELINE_TOOL = ROOT.parent / "shared" / "tools" / "pipecat_baseline.py"
VOICE = ROOT / "examples" / "voices" / "demo"  # a voice folder: voice.yaml, reference recording, consent

PHONE_RATE = 8000
TONE_HZ = 440.0
TONE_AMPLITUDE = 0.3  # as the baseline's ToneBot
REPLY_SECS = 2.0  # the baseline's --tone-secs default, which its load generator expects
CALLER_SPEECH_SECS = 1.5  # the caller profile of pipecat-baseline.md: 1.5 s of speech, 3 s of silence
CALLER_SILENCE_SECS = 3.0
VAD_START_SECS = 0.2
BARGE_IN_MARGIN_SECS = 0.040
LATENCY_TARGET_SECS = 0.5
REQUIRED_CALLS = (1, 10, 50)  # always run for every server; other counts stop once a server has failed

LOAD_SENTENCE = "Hello, I would like to check on the delivery of my order, please."
BARGE_SENTENCES = [
    ("Please tell me everything about my account.", "Wait, stop, I have another question."),
    ("Can you explain my last invoice?", "Sorry, hold on a second."),
    ("What are your opening hours this week?", "No, that is not what I asked."),
    ("I would like to return a pair of shoes.", "Excuse me, one more thing please."),
    ("Where is my parcel right now?", "Hang on, let me find the number."),
]
LATENCY_SENTENCES = [
    "Hello, I would like to check my order.",
    "My order number is four five six seven.",
    "It was supposed to arrive last Tuesday.",
    "Can you send it again to the same address?",
    "Thank you very much, that is all for today.",
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def percentile(values, p):
    """Nearest-rank percentile; None for no values."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return values[max(0, min(len(values) - 1, math.ceil(p / 100 * len(values)) - 1))]


def ms(seconds, digits=0):
    if seconds is None:
        return "–"
    return f"{seconds * 1000:.{digits}f}"


# -- the stand-in engine ---------------------------------------------------------------------------


@dataclass
class StandInChunk:
    audio: np.ndarray  # float32, 24 kHz mono
    frames: tuple[int, int]
    text: str = ""


@dataclass
class StandInConfig:
    is_tiny: bool = False


class StandInSession:
    """A call's engine session (processors.chroma.session_protocol.SpeechSession, what ChromaS2SService
    uses; not subclassed, so a member it lacks fails the protocol test) answering every turn with a
    fixed tone at once. Chunks are `chunk_frames` engine frames (80 ms each) long, as the real session
    streams them; `say=` lines get the same tone."""

    def __init__(self, model: StandInModel, system_prompt: str, chunk_frames: int):
        self.model = model
        self.system_prompt = system_prompt
        self.on_tool_call: Callable[[Any], None] | None = None
        self.chunk_frames = chunk_frames
        self.turns = 0
        self.heard_frames: int | None = None
        self.instructions: list[str] = []
        self.tools: Any = None
        self.tool_results: list[Any] = []
        self.voice: Any = None
        self._cancelled = False

    async def respond(self, user_audio_16k: np.ndarray | None = None, *, say: str | None = None):
        self._cancelled = False
        self.turns += 1
        audio = self.model.reply
        step = int(round(self.chunk_frames * FRAME_SECONDS * SAMPLE_RATE))
        frame = 0
        for i in range(0, audio.size, step):
            if self._cancelled:
                return
            piece = audio[i : i + step]
            frames = max(1, round(piece.size / (FRAME_SECONDS * SAMPLE_RATE)))
            yield StandInChunk(piece, (frame, frame + frames), say or "")
            frame += frames

    def cancel(self) -> None:
        self._cancelled = True

    def heard(self, frames: int) -> None:
        self.heard_frames = frames

    def instruct(self, text: str) -> None:
        self.instructions.append(text)

    def set_tools(self, tools: Any) -> None:
        self.tools = tools

    def tool_result(self, result: Any) -> None:
        self.tool_results.append(result)

    def set_voice(self, voice: Any) -> None:
        self.voice = voice

    async def prepare_voice(self) -> None:
        return None

    @property
    def kept_text(self) -> str:
        return ""


class StandInModel:
    """Stands in for the loaded Chroma model in AgentRuntime: no weights, no steps, no threads."""

    def __init__(self, reply_secs: float = REPLY_SECS):
        self.config = StandInConfig()
        self.source = "stand-in"
        self.device = "cpu"
        n = int(round(reply_secs * SAMPLE_RATE))
        t = np.arange(n) / SAMPLE_RATE
        self.reply = (TONE_AMPLITUDE * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)

    def new_session(self, voice, system_prompt: str = "", *, chunk_frames: int = 2, **_kwargs) -> StandInSession:
        return StandInSession(self, system_prompt, chunk_frames)


# -- agent files and speech --------------------------------------------------------------------------


def agent_file(
    folder: Path,
    *,
    name: str,
    model: str = "tiny",
    vad: str = "webrtc",
    detector: str = "silence",
    silence_secs: float = 0.8,
    max_seconds: float = 30,
) -> Path:
    """The demo agent (examples/agents/demo/agent.yaml) with the given settings; everything else default."""
    path = folder / f"{name}.yaml"
    path.write_text(
        f"""name: bench {name}
model: {model}
voice: {VOICE}
system_prompt: You are the friendly customer-service agent of a small online shop, answering the phone.
vad:
  analyzer: {vad}
  aggressiveness: 2
  frame_ms: 20
  confidence: 0.7
  start_secs: {VAD_START_SECS}
  stop_secs: 0.2
  min_volume: 0.6
turn:
  detector: {detector}
  silence_secs: {silence_secs}
response:
  max_seconds: {max_seconds}
  chunk_frames: 2
  lookahead: 3
  temperature: 0.0
  allow_interruptions: true
"""
    )
    return path


class Speech:
    """espeak-ng sentences as int16 at a given rate, cached in a folder for the run."""

    def __init__(self, folder: Path):
        self.espeak = shutil.which("espeak-ng")
        if self.espeak is None:
            raise SystemExit("espeak-ng is not installed (apt-get install espeak-ng); the benchmark needs it")
        self.folder = folder
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    def wav(self, text: str) -> Path:
        """The sentence as espeak-ng writes it (its own rate)."""
        path = self.folder / f"espeak-{hashlib.sha1(text.encode()).hexdigest()[:12]}.wav"
        if not path.exists():
            subprocess.run([self.espeak, "-w", str(path), text], check=True, capture_output=True)
        return path

    def samples(self, text: str, rate: int) -> np.ndarray:
        key = (text, rate)
        if key not in self._cache:
            from processors.audio_io import read_audio, to_pcm16

            self._cache[key] = to_pcm16(read_audio(self.wav(text), rate))
        return self._cache[key]


def loud_span(samples: np.ndarray, rate: int, floor_db: float = -40.0) -> tuple[float, float]:
    """(start, end) seconds of the speech in `samples`: 10 ms blocks within floor_db of the loudest."""
    block = rate // 100
    n = samples.size // block
    energy = (samples[: n * block].astype(np.float64).reshape(n, block) ** 2).mean(axis=1)
    db = 10 * np.log10(energy + 1e-9)
    loud = np.flatnonzero(db > db.max() + floor_db)
    return loud[0] * block / rate, (loud[-1] + 1) * block / rate
