"""16-bit PCM WAV files in and out, with the stdlib `wave` module and `soxr` for rate changes.

    audio = read_wav("ref.wav", rate=24000)   # float32 mono in [-1, 1], resampled to 24 kHz
    write_wav("reply.wav", audio, 24000)      # 16-bit mono PCM
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import soxr


class WavError(ValueError):
    """A file that is not usable as 16-bit PCM audio; the message names the file."""


def read_wav(path: str | Path, rate: int | None = None) -> np.ndarray:
    """A 16-bit PCM WAV (any rate, any channel count) as float32 mono, resampled to `rate` if given."""
    audio, file_rate = read_wav_native(path)
    if rate is not None and file_rate != rate:
        audio = soxr.resample(audio, file_rate, rate).astype(np.float32, copy=False)
    return audio


def read_wav_native(path: str | Path) -> tuple[np.ndarray, int]:
    """-> (float32 mono audio in [-1, 1], the file's sample rate). Channels are averaged."""
    path = Path(path)
    if not path.exists():
        raise WavError(f"{path}: no such file")
    if not path.is_file():
        raise WavError(f"{path}: not a file")
    try:
        with wave.open(str(path), "rb") as wav:
            channels, width, rate, count = wav.getnchannels(), wav.getsampwidth(), wav.getframerate(), wav.getnframes()
            if width != 2:
                raise WavError(f"{path}: {8 * width}-bit samples, expected 16-bit PCM")
            data = wav.readframes(count)
    except WavError:
        raise
    except (wave.Error, EOFError) as exc:
        raise WavError(f"{path}: not a WAV file this reader understands ({exc}); expected 16-bit PCM WAV") from None
    except OSError as exc:
        raise WavError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if channels < 1 or rate < 1:
        raise WavError(f"{path}: {channels} channels at {rate} Hz; expected at least 1 channel and a positive rate")
    samples = np.frombuffer(data, dtype="<i2")
    samples = samples[: samples.size - samples.size % channels].reshape(-1, channels)
    if samples.shape[0] == 0:
        raise WavError(f"{path}: no audio (0 samples); expected a non-empty recording")
    audio = samples.astype(np.float32).mean(axis=1) / 32768.0
    return audio.astype(np.float32, copy=False), rate


def write_wav(path: str | Path, audio: np.ndarray, rate: int) -> None:
    """float audio in [-1, 1] (clipped) -> 16-bit mono PCM WAV."""
    audio = np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0)
    pcm = np.round(audio * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(int(rate))
        wav.writeframes(pcm.tobytes())
