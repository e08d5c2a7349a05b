"""One call's recording: a stereo 16-bit WAV, the caller on the left and the agent on the right, as
heard on the line, on one timeline, written while the call runs.

    recording = CallRecording(Path("recordings/20261206-101500-3fa9c1.wav"), rate=8000)
    recording.caller(pcm, 8000)      # each chunk as it arrives from the line
    recording.agent(pcm, 8000)       # each chunk as it is written to the line
    recording.close()                # the rest, and the file is complete

The caller's continuous stream is the timeline; the agent's chunks are placed on it by the wall clock
at which each was written to the line, so the two sides stay aligned and silence fills where the
agent said nothing. Samples are written at most `LAG_SECS` behind real time, in a
block about every `FLUSH_SECS`, by one writer thread for the whole process; after each block the
RIFF and data sizes in the header are rewritten, so a process killed mid-call leaves a playable file
holding all but its last second.
"""

from __future__ import annotations

import queue
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from loguru import logger

from processors.audio import StreamResampler

FLUSH_SECS = 0.5  # a block written (and the header updated) about this often
LAG_SECS = 0.25  # audio this recent may still arrive out of step; it waits for the next block
JITTER_SECS = 0.1  # agent audio this far past the end of the last is put at its own time, after silence
STALL_SECS = 1.0  # a caller's side this far behind the clock has stopped sending: silence fills it
HEADER_BYTES = 44


def wav_header(rate: int, data_bytes: int, channels: int = 2) -> bytes:
    """A canonical 44-byte PCM WAV header for 16-bit samples."""
    block = 2 * channels
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_bytes)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, 16)
        + b"data"
        + struct.pack("<I", data_bytes)
    )


class _Channel:
    """One side's samples not yet written, and where it ends on the recording's timeline."""

    def __init__(self, rate: int):
        self.rate = rate
        self.pending: list[np.ndarray] = []
        self.end = 0  # samples from the recording's start to the end of what this side holds
        self._resamplers: dict[int, StreamResampler] = {}

    def convert(self, pcm: bytes, rate: int) -> np.ndarray:
        if rate != self.rate:
            resampler = self._resamplers.get(rate)
            if resampler is None:
                resampler = self._resamplers[rate] = StreamResampler(rate, self.rate)
            pcm = resampler.process(pcm)
        return np.frombuffer(pcm, dtype=np.int16)

    def held_back(self) -> np.ndarray:
        """What the resamplers still hold (the end of the stream)."""
        tails = [np.frombuffer(r.flush(), dtype=np.int16) for r in self._resamplers.values()]
        return np.concatenate(tails) if tails else np.zeros(0, np.int16)

    def append(self, samples: np.ndarray) -> None:
        self.pending.append(samples)
        self.end += len(samples)

    def pad(self, to: int) -> None:
        if to > self.end:
            self.append(np.zeros(to - self.end, np.int16))

    def take(self, n: int) -> np.ndarray:
        """The next n samples (the caller made sure they are held)."""
        held = np.concatenate(self.pending) if len(self.pending) != 1 else self.pending[0]
        self.pending = [held[n:]] if len(held) > n else []
        return held[:n]

    def drop_last(self, n: int) -> None:
        held = self.take(sum(len(p) for p in self.pending))
        self.pending = [held[: max(0, len(held) - n)]]
        self.end -= min(n, len(held))


class CallRecording:
    """Caller left, agent right, at `rate` (the line's rate, or 16 kHz); other rates are resampled.
    All methods run on the event loop and return at once: the file is written on the writer thread.

    The caller's audio is a continuous stream (phones and browsers send audio all the time, silence
    too), so it is the recording's timeline: caller sample k is at sample k. Where that sample was
    on the wall clock is estimated from arrivals (the earliest `arrival - samples so far / rate`: a
    transport delivers late, never early), so audio that queued up (a call's first second, while its
    pipeline starts) keeps its place, and each agent chunk is placed by the time it was written."""

    def __init__(self, path: Path, rate: int, *, clock: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self.rate = rate
        self._clock = clock
        self._t0 = clock()
        self._origin: float | None = None  # wall time of the recording's sample 0
        self._caller = _Channel(rate)
        self._agent = _Channel(rate)
        self._agent_chunks: list[tuple[float, np.ndarray]] = []  # (written at, samples), to be placed
        self._agent_at = -1e9  # when the agent's last chunk was written
        self._agent_resampled = False  # a resampler holds the end of the agent's last chunks
        self._written = 0  # samples per side handed to the writer
        self._flushed_at = self._t0
        self.caller_muted = False
        self.closed = False
        _writer().submit(_Open(self.path, rate))

    def caller(self, pcm: bytes, rate: int) -> None:
        """A chunk of the caller's audio, just received (silenced while `caller_muted`)."""
        if self.closed:
            return
        samples = self._caller.convert(pcm, rate)
        if self.caller_muted:
            samples = np.zeros(len(samples), np.int16)
        now = self._clock()
        self._caller.append(samples)
        # The caller's first sample starts the recording; a chunk that came late cannot move it later.
        estimate = now - self._caller.end / self.rate
        self._origin = estimate if self._origin is None else min(self._origin, estimate)
        self._maybe_flush()

    def agent(self, pcm: bytes, rate: int) -> None:
        """A chunk of the agent's audio, just written to the line."""
        if self.closed:
            return
        now = self._clock()
        if now - self._agent_at > JITTER_SECS:
            self._agent_tail()  # a new reply: the last one's end, still in the resampler, goes first
        self._agent_chunks.append((now, self._agent.convert(pcm, rate)))
        self._agent_at, self._agent_resampled = now, self._agent_resampled or rate != self.rate
        self._maybe_flush()

    def _agent_tail(self) -> None:
        if self._agent_resampled:
            self._agent_resampled = False
            tail = self._agent.held_back()
            self._agent_chunks.append((self._agent_at + len(tail) / self.rate, tail))

    def cut_agent(self, seconds: float) -> None:
        """Drop the agent's last `seconds` not yet written: sent, then cleared unplayed (a barge-in on a
        line that plays from its own queue)."""
        self._place_agent()
        self._agent.drop_last(min(round(seconds * self.rate), self._agent.end - self._written))

    def _position(self, at: float) -> int:
        return round((at - (self._t0 if self._origin is None else self._origin)) * self.rate)

    def _place_agent(self) -> None:
        for at, samples in self._agent_chunks:
            start = self._position(at) - len(samples)
            if start - self._agent.end > JITTER_SECS * self.rate:
                self._agent.pad(start)  # nothing was said for a while: silence up to where this belongs
            self._agent.append(samples)
        self._agent_chunks.clear()

    def _maybe_flush(self) -> None:
        if self._clock() - self._flushed_at >= FLUSH_SECS:
            self.flush()

    def flush(self, *, final: bool = False) -> None:
        """Hand the writer everything up to `LAG_SECS` ago (`final`: everything)."""
        now = self._flushed_at = self._clock()
        if final or now - self._agent_at > JITTER_SECS:
            self._agent_tail()
        self._place_agent()
        clock_pos = self._position(now)
        if clock_pos - self._caller.end > STALL_SECS * self.rate:
            self._caller.pad(clock_pos - round(STALL_SECS * self.rate))  # the caller's side sends nothing
        if final:
            target = max(self._caller.end, self._agent.end)
        else:
            target = min(self._caller.end, clock_pos - round(LAG_SECS * self.rate))
        if target <= self._written:
            return
        self._caller.pad(target)
        self._agent.pad(target)
        n = target - self._written
        frames = np.empty((n, 2), np.int16)
        frames[:, 0] = self._caller.take(n)
        frames[:, 1] = self._agent.take(n)
        self._written = target
        _writer().submit(_Append(self.path, frames.tobytes()))

    def close(self) -> None:
        """Write what is held (to the end of the longer side) and finish the file."""
        if self.closed:
            return
        self.flush(final=True)
        self.closed = True
        _writer().submit(_Close(self.path))

    @property
    def seconds(self) -> float:
        """Seconds handed to the writer so far."""
        return self._written / self.rate


# -- the writer thread: one per process, in order, never on the event loop ------------------------------


class _Open:
    def __init__(self, path: Path, rate: int):
        self.path, self.rate = path, rate


class _Append:
    def __init__(self, path: Path, data: bytes):
        self.path, self.data = path, data


class _Close:
    def __init__(self, path: Path):
        self.path = path


class RecordingWriter:
    """Writes every call's recording on one thread; a failing file is logged once and dropped."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._files: dict[Path, tuple] = {}  # path -> (file, data bytes written)
        self._failed: set[Path] = set()
        self._thread = threading.Thread(target=self._run, name="recording-writer", daemon=True)
        self._thread.start()

    def submit(self, job) -> None:
        self._jobs.put(job)

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait until every job submitted so far is done (tests, shutdown); False on timeout."""
        done = threading.Event()
        self._jobs.put(done)
        return done.wait(timeout)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if isinstance(job, threading.Event):
                job.set()
                continue
            try:
                self._do(job)
            except Exception as exc:  # a disk problem loses this recording, never the call or the others
                if job.path not in self._failed:
                    self._failed.add(job.path)
                    logger.error(f"recording {job.path}: writing failed ({exc!r}); the rest is not recorded")
                entry = self._files.pop(job.path, None)
                if entry is not None:
                    entry[0].close()

    def _do(self, job) -> None:
        if job.path in self._failed:
            return
        if isinstance(job, _Open):
            job.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(job.path, "wb")  # noqa: SIM115 - held open across jobs, closed by _Close
            f.write(wav_header(job.rate, 0))
            f.flush()
            self._files[job.path] = (f, 0)
            return
        f, size = self._files[job.path]
        if isinstance(job, _Append):
            f.write(job.data)
            size += len(job.data)
            # The sizes first land in the page cache with the data: a killed process leaves both.
            f.seek(4)
            f.write(struct.pack("<I", 36 + size))
            f.seek(40)
            f.write(struct.pack("<I", size))
            f.seek(0, 2)
            f.flush()
            self._files[job.path] = (f, size)
        else:
            f.close()
            del self._files[job.path]


_shared: RecordingWriter | None = None
_shared_lock = threading.Lock()


def _writer() -> RecordingWriter:
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = RecordingWriter()
        return _shared


def drain_recordings(timeout: float = 5.0) -> bool:
    """Wait for every recording write submitted so far to reach the file."""
    return _writer().drain(timeout)
