"""Reference audio for cloning: read it, check it, and make it the 24 kHz mono the codec encodes.

    prepared = prepare_audio("me.flac", "Hello, this is my voice.")
    prepared.problems     # [] when the recording is usable; each says what is wrong and the limit
    prepared.notes        # what was changed on the way: mixed down, trimmed, gain
    prepared.audio        # float32, 24 kHz mono, silence trimmed, loudness normalised

Every check runs and every problem is reported, so one pass tells the user all there is to fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import loudness
import numpy as np
import soundfile

from processors.audio_io import AudioFileError, read_audio_channels, resample, write_wav
from processors.chroma.rates import SAMPLE_RATE  # the codec's rate: references are stored at it

FORMATS = {".wav": "WAV", ".flac": "FLAC", ".mp3": "MP3", ".ogg": "OGG"}

MIN_RATE = 16000
MIN_SECONDS = 3.0
MAX_SECONDS = 30.0
MIN_SPEECH_FRACTION = 0.4
CLIP_LEVEL = 0.999  # |sample| at or above this is full scale
MAX_CLIPPED_FRACTION = 0.001
MIN_LOUDNESS = -45.0  # LUFS
TARGET_LOUDNESS = -20.0  # LUFS: a level that leaves room below full scale for speech peaks
PEAK_CEILING = 10 ** (-1 / 20)  # -1 dBFS: normalising never pushes a peak past this
LETTERS_PER_SECOND = (2.5, 25.0)  # everyday speech is about 8 to 18; outside this the transcript is not of this audio

ACTIVITY_FRAME_SECONDS = 0.02  # speech activity is judged per 20 ms
SPEECH_BELOW_PEAK_DB = 35.0  # a frame within this of the loud frames counts as speech...
SPEECH_FLOOR_DB = -60.0  # ...and so does nothing quieter than this
TRIM_PAD_SECONDS = 0.1  # kept around the speech so that its first and last sounds are whole

WHY_SHORT = "too little of the voice to clone its timbre and manner"
WHY_LONG = (
    "the whole reference is the backbone's prompt before every response, so it costs time to first "
    "audio and positions of the backbone's context on every turn, and a longer one adds little likeness"
)
WHY_RATE = (
    "below 16 kHz (telephone audio is 8 kHz) the upper band of the voice is missing, and the clone "
    "would sound muffled; record at 16 kHz or more"
)


@dataclass
class PreparedAudio:
    audio: np.ndarray  # float32, 24 kHz mono, trimmed and normalised; empty when the file is unusable
    source_rate: int = 0
    channels: int = 0
    seconds: float = 0.0  # after trimming
    loudness: float | None = None  # integrated loudness (LUFS) as recorded, after trimming
    gain_db: float = 0.0
    speech_fraction: float = 0.0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """-> (float32 samples [n, channels], rate). Raises ValueError with the reason."""
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"'{path.suffix or path.name}' files are not accepted; expected {_formats()}")
    if path.exists() and kind not in soundfile.available_formats():
        raise ValueError(f"{kind} needs libsndfile 1.1 or newer, and this one is {soundfile.__libsndfile_version__}; "
                         "convert the recording to WAV or FLAC")
    try:
        return read_audio_channels(path)
    except AudioFileError as exc:
        raise ValueError(exc.reason) from None


def prepare_audio(path: str | Path, transcript: str | None = None) -> PreparedAudio:
    """Check a reference recording (and its transcript, when given) and prepare it for the codec."""
    try:
        samples, rate = read_audio(Path(path))
    except ValueError as exc:
        return PreparedAudio(np.zeros(0, np.float32), problems=[str(exc)])
    out = PreparedAudio(np.zeros(0, np.float32), source_rate=rate, channels=samples.shape[1])
    clipped = float(np.mean(np.abs(samples) >= CLIP_LEVEL, axis=0).max())  # per channel: a mix hides it
    if rate < MIN_RATE:
        out.problems.append(f"sample rate {rate} Hz is below {MIN_RATE} Hz: {WHY_RATE}")
    if samples.shape[1] > 1:
        out.notes.append(f"{samples.shape[1]} channels mixed down to mono")
    mono = resample(samples.mean(axis=1), rate, SAMPLE_RATE)

    active = speech_frames(mono, SAMPLE_RATE)
    if not active.any():
        out.problems.append("no speech found: the audio is silent")
        return out
    step = int(ACTIVITY_FRAME_SECONDS * SAMPLE_RATE)
    pad = int(TRIM_PAD_SECONDS * SAMPLE_RATE)
    first, last = np.flatnonzero(active)[[0, -1]]
    start, end = max(0, first * step - pad), min(mono.size, (last + 1) * step + pad)
    trimmed_s = (mono.size - (end - start)) / SAMPLE_RATE
    if trimmed_s >= 0.05:
        out.notes.append(f"{start / SAMPLE_RATE:.2f} s of leading and {(mono.size - end) / SAMPLE_RATE:.2f} s "
                         "of trailing silence trimmed")
    audio = mono[start:end]
    out.seconds = audio.size / SAMPLE_RATE
    out.speech_fraction = float(active[first : last + 1].mean())

    if out.seconds < MIN_SECONDS:
        out.problems.append(f"too short: {out.seconds:.1f} s of speech after trimming silence, expected at least "
                            f"{MIN_SECONDS:g} s: {WHY_SHORT}")
    if out.seconds > MAX_SECONDS:
        out.problems.append(f"too long: {out.seconds:.1f} s after trimming silence, expected at most "
                            f"{MAX_SECONDS:g} s: {WHY_LONG}; cut it to 5 to 15 s of clean speech")
    if out.speech_fraction < MIN_SPEECH_FRACTION:
        out.problems.append(f"mostly silence: speech in {100 * out.speech_fraction:.0f}% of it, expected at least "
                            f"{100 * MIN_SPEECH_FRACTION:.0f}%: pauses are cloned as part of the voice's manner; "
                            "cut the long pauses out")
    if clipped > MAX_CLIPPED_FRACTION:
        out.problems.append(f"clipped: {100 * clipped:.2f}% of samples at full scale, expected at most "
                            f"{100 * MAX_CLIPPED_FRACTION:.1f}%: the distortion would be cloned too; record again "
                            "with lower input gain")

    out.loudness = measure_loudness(audio)
    if out.loudness is None or out.loudness < MIN_LOUDNESS:
        shown = "unmeasurable" if out.loudness is None else f"{out.loudness:.1f} LUFS"
        out.problems.append(f"too quiet: {shown}, expected at least {MIN_LOUDNESS:g} LUFS: at that level the "
                            "recording's own noise is a large part of it, and raising the level raises the noise")
    else:
        audio, out.gain_db = normalise(audio, out.loudness)
        if abs(out.gain_db) >= 0.5:
            out.notes.append(f"loudness {out.loudness:.1f} LUFS, normalised by {out.gain_db:+.1f} dB "
                             f"(target {TARGET_LOUDNESS:g} LUFS, peaks at most -1 dBFS)")
    out.audio = audio.astype(np.float32, copy=False)
    if transcript is not None:
        out.problems += transcript_problems(transcript, out.seconds)
    return out


def speech_frames(audio: np.ndarray, rate: int) -> np.ndarray:
    """bool per 20 ms frame: loud enough, relative to the recording's loud frames, to be speech."""
    step = int(ACTIVITY_FRAME_SECONDS * rate)
    frames = audio[: audio.size // step * step].astype(np.float64).reshape(-1, step)
    if frames.size == 0:
        return np.zeros(0, dtype=bool)
    level = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    loud = np.percentile(level, 95)
    return level > max(loud - SPEECH_BELOW_PEAK_DB, SPEECH_FLOOR_DB)


def measure_loudness(audio: np.ndarray) -> float | None:
    """Integrated loudness (ITU-R BS.1770, LUFS); None for audio too short or too quiet to gate."""
    if audio.size < int(0.4 * SAMPLE_RATE):
        return None
    value = loudness.integrated_loudness(np.ascontiguousarray(audio, dtype=np.float32), SAMPLE_RATE)
    return float(value) if np.isfinite(value) else None


def normalise(audio: np.ndarray, measured: float) -> tuple[np.ndarray, float]:
    """Gain to the target loudness, held back where it would push a peak past -1 dBFS."""
    gain_db = TARGET_LOUDNESS - measured
    peak = float(np.abs(audio).max())
    if peak > 0:
        gain_db = min(gain_db, 20 * np.log10(PEAK_CEILING / peak))
    return audio * np.float32(10 ** (gain_db / 20)), float(gain_db)


def transcript_problems(transcript: str, speech_seconds: float) -> list[str]:
    text = transcript.strip()
    if not text:
        return ["transcript is empty; expected every word spoken in the reference audio"]
    if speech_seconds < 1.0:
        return []  # the audio is already reported as too short; no rate means much over so little
    letters = sum(ch.isalnum() for ch in text)
    rate = letters / speech_seconds
    low, high = LETTERS_PER_SECOND
    if low <= rate <= high:
        return []
    which = "short" if rate < low else "long"
    return [f"transcript too {which} for the audio: {letters} letters for {speech_seconds:.1f} s of speech "
            f"({rate:.1f} per second), expected {low:g} to {high:g}: the model reads the transcript alongside "
            "the audio, so it must be exactly the words spoken in it, no more and no fewer"]


def write_reference(path: Path, audio: np.ndarray) -> None:
    """The stored form: 24 kHz mono 16-bit PCM WAV."""
    write_wav(path, audio, SAMPLE_RATE)


def _formats() -> str:
    names = list(FORMATS.values())
    return ", ".join(names[:-1]) + " or " + names[-1] + " (" + ", ".join(FORMATS) + ")"
