"""Real speech for tests: espeak-ng synthesis at a given rate, with its true start and end."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.testing import speech

ESPEAK = shutil.which("espeak-ng")
requires_espeak = pytest.mark.skipif(
    ESPEAK is None, reason="espeak-ng is not installed (apt-get install espeak-ng)"
)


def synthesize(text: str, rate: int) -> np.ndarray:
    """``text`` spoken by espeak-ng as 16-bit mono samples at ``rate``, cached per (text, rate)."""
    if ESPEAK is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    return speech.synthesize(text, rate)


RECORDINGS = Path(__file__).parent / "fixtures" / "speech"


def recorded(name: str, rate: int) -> np.ndarray:
    """The committed espeak-ng recording ``tests/fixtures/speech/{name}.wav`` as int16 mono at ``rate``.

    For tests that assert a model's verdict (VAD, Smart Turn): another espeak-ng build speaks the same
    text differently, and the verdict with it. Resampled as ``synthesize`` resamples espeak-ng's output.
    """
    return speech.read_wav(RECORDINGS / f"{name}.wav", rate)


def speech_bounds(samples: np.ndarray, rate: int, *, floor_db: float = -40.0) -> tuple[float, float]:
    """Seconds where speech starts and ends: first and last 10 ms block within ``floor_db`` of the loudest."""
    block = rate // 100
    blocks = samples[: len(samples) // block * block].astype(np.float64).reshape(-1, block)
    energy_db = 10 * np.log10(np.mean(blocks**2, axis=1) + 1e-9)
    loud = np.flatnonzero(energy_db > energy_db.max() + floor_db)
    return loud[0] * block / rate, (loud[-1] + 1) * block / rate


def silence(seconds: float, rate: int) -> np.ndarray:
    return np.zeros(round(seconds * rate), dtype=np.int16)
