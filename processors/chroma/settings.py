"""What a pipecat user hands `ChromaS2SService` instead of a session: a model, a voice and settings.

    service = ChromaS2SService(model="FlashLabs/Chroma-4B", voice="examples/voices/demo",
                               settings=ChromaSettings(system_prompt="You are a helpful receptionist."))

The model is loaded once per process and device (every service on it shares its batched scheduler);
the voice is a voice folder (a path) or a name in the voice library (`chroma-agent voice list`).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from voices.library import VoiceLibrary
from voices.profile import Voice, load_voice

from .config import FRAME_SECONDS

_models: dict[tuple[str, str], object] = {}
_models_lock = threading.Lock()


@dataclass(frozen=True)
class ChromaSettings:
    """How each reply is generated. The defaults are the agent file's (`response:`)."""

    system_prompt: str = ""
    temperature: float = 0.0  # 0: greedy, exactly repeatable
    top_k: int = 50
    max_seconds: float = 30.0  # cap on one reply's audio
    chunk_frames: int = 2  # 80 ms frames per audio chunk sent on: lower starts sooner, costs more
    lookahead: int = 3  # thinker tokens generated ahead of the audio

    def __post_init__(self):
        checks = [
            ("temperature", self.temperature, 0 <= self.temperature <= 2, "0 to 2"),
            ("top_k", self.top_k, 1 <= self.top_k <= 1000, "1 to 1000"),
            ("max_seconds", self.max_seconds, 1 <= self.max_seconds <= 300, "1 to 300"),
            ("chunk_frames", self.chunk_frames, 1 <= self.chunk_frames <= 4, "1 to 4"),
            ("lookahead", self.lookahead, 1 <= self.lookahead <= 8, "1 to 8"),
        ]
        for name, value, ok, expected in checks:
            if not ok:
                raise ValueError(f"ChromaSettings.{name} is {value!r}, expected {expected}")

    @property
    def max_frames(self) -> int:
        return math.ceil(self.max_seconds / FRAME_SECONDS)


def shared_model(source: str = "tiny", device: str = "auto"):
    """The process's model for `source` on `device` ("auto": CUDA when present), loaded on first use."""
    from .checkpoint import load_model

    key = (str(source), device)
    with _models_lock:
        if key not in _models:
            logger.info(f"loading Chroma model {source!r} ({device})")
            _models[key] = load_model(source, device=None if device == "auto" else device)
            if _models[key].config.is_tiny:
                logger.warning(
                    "the 'tiny' model is an untrained stand-in: it speaks noise, not words; use "
                    "FlashLabs/Chroma-4B or a checkpoint folder for speech"
                )
        return _models[key]


def find_voice(voice: str | Path | Voice, library: str | Path | None = None) -> Voice:
    """A loaded voice from a `Voice`, a voice folder (a path) or a library name."""
    if isinstance(voice, Voice):
        return voice
    if isinstance(voice, Path):
        return load_voice(voice)
    return load_voice(VoiceLibrary(library).resolve(voice))


def open_session(model, voice: str | Path | Voice, settings: ChromaSettings | None = None, **kwargs):
    """A new engine session (one per call) on `model` (a loaded model, or a source for `shared_model`)."""
    from .generation import Sampling

    settings = settings or ChromaSettings()
    if isinstance(model, str | Path):
        model = shared_model(str(model))
    sampling = Sampling(
        do_sample=settings.temperature > 0, temperature=settings.temperature or 1.0, top_k=settings.top_k
    )
    return model.new_session(
        find_voice(voice),
        settings.system_prompt,
        chunk_frames=settings.chunk_frames,
        lookahead=settings.lookahead,
        max_frames=settings.max_frames,
        sampling=sampling,
        **kwargs,
    )
