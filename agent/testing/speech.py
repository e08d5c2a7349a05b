"""A scripted caller's voice: text spoken by espeak-ng at a transport's rate, cached per (text, rate)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from processors.audio_io import read_audio, to_pcm16

CACHE_DIR = Path(tempfile.gettempdir()) / "chroma-agents-speech"


class SpeechUnavailable(RuntimeError):
    """espeak-ng is not installed."""


def espeak() -> str | None:
    return shutil.which("espeak-ng")


def synthesize(text: str, rate: int) -> np.ndarray:
    """`text` spoken by espeak-ng as int16 mono at `rate`. Raises SpeechUnavailable without espeak-ng."""
    binary = espeak()
    if binary is None:
        raise SpeechUnavailable(
            "caller turns given as text are spoken with espeak-ng, which is not installed "
            "(apt-get install espeak-ng), or give the turn as audio: a WAV file"
        )
    key = hashlib.sha1(f"{rate}:{text}".encode()).hexdigest()[:16]
    cached = CACHE_DIR / f"{key}.npy"
    if cached.exists():
        return np.load(cached)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    wav_path = CACHE_DIR / f"{key}.wav"
    subprocess.run([binary, "-w", str(wav_path), text], check=True, capture_output=True)
    samples = to_pcm16(read_audio(wav_path, rate))
    np.save(cached, samples)
    return samples


def read_wav(path: str | Path, rate: int) -> np.ndarray:
    """An audio file (WAV, FLAC, OGG, MP3; any rate and channels) as int16 mono at `rate`
    (raises processors.audio_io.AudioFileError naming the file)."""
    return to_pcm16(read_audio(path, rate))
