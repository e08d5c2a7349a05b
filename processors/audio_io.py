"""Audio files in and out, on libsndfile (`soundfile`) and `soxr`: the one place a file becomes samples.

    audio = read_audio("caller.flac", rate=16000)   # float32 mono in [-1, 1] at 16 kHz
    audio, rate = read_audio_native("hold.wav")     # float32 mono at the file's own rate
    write_wav("reply.wav", audio, 24000)            # 16-bit mono PCM

Any rate, channel count and sample format libsndfile reads (WAV 8/16/24/32-bit int and float,
FLAC, OGG, MP3) is accepted, mixed down to mono and resampled on request. A file that is not
usable raises `AudioFileError`, whose message names the file and what is wrong with it.

float <-> int16 uses one scale, 32768, both ways (libsndfile's when it reads 16-bit PCM as float),
rounding to nearest and clipping at the int16 range, so int16 -> float -> int16 is exact.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import soundfile
import soxr

PCM16_SCALE = 32768.0
# soxr "HQ" for whole files: no latency to trade against (the streaming paths use processors.audio).
FILE_RESAMPLE_QUALITY = "HQ"
_UNKNOWN_SIZE = 0xFFFFFFFF  # what streaming writers put in a WAV header whose length they did not know


class AudioFileError(ValueError):
    """An audio file that cannot be used; `reason` says why, and the message names the file."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """float samples in [-1, 1] -> int16 (rounded to nearest, clipped); int16 input is returned as is."""
    audio = np.asarray(audio)
    if audio.dtype == np.int16:
        return audio
    scaled = np.rint(audio.astype(np.float64) * PCM16_SCALE)
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def to_float(pcm: np.ndarray | bytes) -> np.ndarray:
    """int16 samples (an array, or little-endian bytes) -> float32 in [-1, 1)."""
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        pcm = np.frombuffer(pcm, dtype="<i2")
    return (np.asarray(pcm, dtype=np.int16).astype(np.float32) / np.float32(PCM16_SCALE)).astype(np.float32)


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Whole float mono audio from one rate to another (float32)."""
    audio = np.asarray(audio, dtype=np.float32)
    if from_rate == to_rate or audio.size == 0:
        return audio
    return soxr.resample(audio, from_rate, to_rate, quality=FILE_RESAMPLE_QUALITY).astype(np.float32, copy=False)


def read_audio_channels(path: str | Path) -> tuple[np.ndarray, int]:
    """-> (float32 samples shaped [frames, channels], the file's rate). Raises AudioFileError."""
    path = Path(path)
    if not path.exists():
        raise AudioFileError(path, "no such file")
    if not path.is_file():
        raise AudioFileError(path, "is a folder, expected an audio file" if path.is_dir() else "not a regular file")
    try:
        size = path.stat().st_size
        if size == 0:
            raise AudioFileError(path, "empty file (0 bytes), expected audio")
        with path.open("rb") as f:
            head = f.read(12)
            if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
                _check_wav_length(path, f, size)
            f.seek(0)
            # libsndfile reads a short data chunk without complaint, so the check above comes first.
            with soundfile.SoundFile(f) as sound:
                rate, channels = int(sound.samplerate), int(sound.channels)
                samples = sound.read(dtype="float32", always_2d=True)
    except AudioFileError:
        raise
    except soundfile.LibsndfileError as exc:
        raise AudioFileError(
            path, f"not audio that libsndfile can read ({exc.error_string}); expected WAV, FLAC, OGG or MP3"
        ) from None
    except (RuntimeError, TypeError, ValueError) as exc:
        raise AudioFileError(path, f"not readable as audio ({exc}); expected WAV, FLAC, OGG or MP3") from None
    except OSError as exc:
        raise AudioFileError(path, f"cannot be read ({exc.strerror or exc})") from None
    if rate < 1 or channels < 1:
        raise AudioFileError(path, f"{channels} channels at {rate} Hz; expected at least 1 channel and a positive rate")
    if samples.shape[0] == 0:
        raise AudioFileError(path, "no audio: the header is there but holds 0 frames; expected a recording")
    if not np.isfinite(samples).all():
        raise AudioFileError(path, "holds NaN or infinite samples; expected finite audio")
    return samples, rate


def read_audio_native(path: str | Path) -> tuple[np.ndarray, int]:
    """-> (float32 mono in [-1, 1], the file's rate). Channels are averaged."""
    samples, rate = read_audio_channels(path)
    mono = samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1)
    return np.ascontiguousarray(mono, dtype=np.float32), rate


def read_audio(path: str | Path, rate: int | None = None) -> np.ndarray:
    """float32 mono in [-1, 1], resampled to `rate` when given."""
    audio, file_rate = read_audio_native(path)
    return audio if rate is None else resample(audio, file_rate, rate)


def write_wav(path: str | Path, audio: np.ndarray, rate: int) -> None:
    """Mono audio (float in [-1, 1], clipped, or int16) -> a 16-bit PCM WAV at `rate`."""
    pcm = to_pcm16(np.asarray(audio).reshape(-1))
    # int16 in, PCM_16 out: libsndfile writes the samples as they are, so the rounding is ours alone.
    soundfile.write(str(path), pcm, int(rate), subtype="PCM_16", format="WAV")


def _check_wav_length(path: Path, f, size: int) -> None:
    """A WAV's data chunk must be as long as its header says; a cut-off copy or an interrupted
    recording is not, and libsndfile would quietly read what is left."""
    offset = 12
    while offset + 8 <= size:
        f.seek(offset)
        chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
        if chunk_id == b"data":
            available = size - offset - 8
            if chunk_size != _UNKNOWN_SIZE and chunk_size > available:
                raise AudioFileError(
                    path, f"truncated: header says {chunk_size} bytes of audio, file has {available}"
                )
            return
        offset += 8 + chunk_size + (chunk_size & 1)  # chunks are padded to an even length
    if offset > size:
        raise AudioFileError(path, f"truncated: the WAV header's chunks run past the end of the file ({size} bytes)")
    raise AudioFileError(path, "WAV header without a data chunk: holds no audio")
