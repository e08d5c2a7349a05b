"""One scheduler per model: every reply in flight advances one frame per tick, as one batch.

A tick takes every live reply that has room for more audio, asks each for its next backbone
inputs (the thinker runs ahead here), runs one batched backbone forward and one batched depth
decoder pass, and hands each reply its frame; a reply whose chunk is complete decodes it and
delivers it to its session's event loop. Replies join and leave between ticks (continuous
batching); each keeps its own backbone cache in one row of a shared pool, packed so that the
batch is always rows 0..B-1.

Work that is not a frame (a new turn's audio encoder and thinker prefill, a voice prefix) is
a job: the scheduler runs at most one job, or one piece of a job written as a generator, between
two ticks, so a new caller's turn delays the others' audio by at most one piece per tick.

All model work for a model runs on this one thread, so the event loop never blocks and no two
steps race on a cache.
"""

from __future__ import annotations

import asyncio
import atexit
import inspect
import statistics
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from loguru import logger

from .codec_stream import StreamingCodecDecoder
from .codec_stream import decode_together as decode_chunks
from .frame_step import FrameStep, RowPick
from .generation import ResponseSteps, VoicePrompt, codec_codes
from .modeling import ChromaModel
from .rates import FRAME_SECONDS  # one codec frame: the budget of one tick for every reply to stay real time
from .thinker_batch import decode_together as think_together

# Ticks (each with the job before it) averaged over about two seconds: one long prefill is not
# "behind", a batch that needs more than a frame's time per tick, tick after tick, is.
TICK_SMOOTHING = 0.04


class ReplyStream:
    """One reply in flight: its steps, its backbone row, and the queue its chunks go to.

    `make_chunk(frames, audio)` (the session's) turns a list of frame codes and their audio (decoded
    by `codec`, this reply's streaming decoder, batched with the other replies') into what the
    consumer gets; it runs on the scheduler thread. The consumer calls `taken()` for each item it reads, which
    lets the reply run `max_pending` chunks ahead of it and no more."""

    def __init__(
        self,
        steps: ResponseSteps,
        prompt: VoicePrompt,
        chunk_frames: int,
        codec: StreamingCodecDecoder,
        make_chunk: Callable[[list[torch.Tensor], torch.Tensor], object],
        loop: asyncio.AbstractEventLoop,
        max_pending: int = 2,
    ):
        self.steps = steps
        self.prompt = prompt
        self.chunk_frames = chunk_frames
        self.codec = codec
        self.make_chunk = make_chunk
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.max_pending = max_pending
        self.cancelled = threading.Event()
        self.row: int | None = None
        self.length = 0  # positions filled in this reply's backbone row
        self.frames: list[torch.Tensor] = []
        self.frames_made = 0
        self.started = time.perf_counter()
        self.finished = False
        self._pending = 0
        self._lock = threading.Lock()
        self._scheduler: FrameScheduler | None = None

    def cancel(self) -> None:
        self.cancelled.set()
        if self._scheduler is not None:
            self._scheduler.wake()

    def taken(self) -> None:
        with self._lock:
            self._pending -= 1
        if self._scheduler is not None:
            self._scheduler.wake()

    @property
    def has_room(self) -> bool:
        with self._lock:
            return self._pending < self.max_pending

    def deliver(self, item) -> bool:
        """Put a chunk, the end (None) or an exception on the consumer's queue; False if it is gone."""
        with self._lock:
            self._pending += 1
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
            return True
        except RuntimeError:  # the consumer's loop is closed: nobody will read this reply
            self.cancelled.set()
            return False


@dataclass
class EngineStats:
    """What a server's capacity check and /metrics read (`FrameScheduler.status()`)."""

    sessions: int = 0  # replies in flight now
    batch_size: int = 0  # rows advanced by the last tick
    tick_seconds: float = 0.0  # moving average of a tick plus the job before it
    behind_real_time: bool = False
    ticks: int = 0
    frames: int = 0
    reply_rtf: list[float] = field(default_factory=list)  # wall / audio of the replies in flight


class FrameScheduler:
    """The one thread that runs a model's steps: jobs between ticks, and batched frame ticks."""

    _by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _registry_lock = threading.Lock()

    def __init__(self, model: ChromaModel, initial_rows: int = 4):
        self.model = model
        self._initial_rows = initial_rows
        self._cuda_graphs: bool | None = None  # None: on where the device is CUDA
        self._step: FrameStep | None = None
        self._streams: list[ReplyStream] = []
        self._jobs: deque[tuple[Callable, tuple, Future]] = deque()
        self._piecewise: deque[tuple[object, Future]] = deque()  # generator jobs under way
        self._wake = threading.Condition()
        self._stats = EngineStats()
        self._tick_avg = 0.0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"chroma-{model.device}", daemon=True)
        self._thread.start()

    @classmethod
    def close_all(cls) -> None:
        """Stop every scheduler's thread (at interpreter exit, so none dies inside a torch op)."""
        with cls._registry_lock:
            schedulers = list(cls._by_model.values())
        for scheduler in schedulers:
            scheduler.close()

    @classmethod
    def for_model(cls, model: ChromaModel) -> FrameScheduler:
        with cls._registry_lock:
            scheduler = cls._by_model.get(model)
            if scheduler is None or scheduler._closed:
                scheduler = cls._by_model[model] = cls(model)
            return scheduler

    # -- the event loop's side ------------------------------------------------------

    async def run(self, fn: Callable, *args):
        """Run `fn(*args)` on the scheduler thread between two ticks and return its result."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine scheduler is closed")
            self._jobs.append((fn, args, future))
            self._wake.notify()
        return future

    def set_cuda_graphs(self, on: bool) -> None:
        """Replay the depth decoder as captured CUDA graphs (on CUDA), or run it eagerly."""
        self._cuda_graphs = on
        if self._step is not None:
            self._step.cuda_graphs = on

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    def status(self) -> dict:
        s = self._stats
        return {
            "sessions": s.sessions, "batch_size": s.batch_size, "tick_seconds": s.tick_seconds,
            "behind_real_time": s.behind_real_time, "ticks": s.ticks, "frames": s.frames,
            "reply_rtf": list(s.reply_rtf),
            "reply_rtf_max": max(s.reply_rtf, default=0.0),
            "reply_rtf_median": statistics.median(s.reply_rtf) if s.reply_rtf else 0.0,
        }

    def close(self) -> None:
        """Stop the thread after the job or tick under way; replies in flight end with an error."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # -- the scheduler thread's side ---------------------------------------------------

    def admit(self, stream: ReplyStream) -> None:
        """Give a reply a backbone row holding its voice prefix; it runs from the next tick on.
        Called on the scheduler thread (from a job)."""
        if self._step is None:
            self._step = FrameStep(self.model, self._initial_rows, cuda_graphs=self._cuda_graphs)
        step = self._step
        row = len(self._streams)
        if row >= step.rows:
            step.grow(2 * step.rows)
        stream.length = step.pool.load(row, stream.prompt.keys_values)
        stream.row, stream._scheduler = row, self
        self._streams.append(stream)

    def retire(self, stream: ReplyStream, last_item: BaseException | None = None) -> None:
        """Take a reply out of the batch (ended, cancelled or failed), keeping the rows packed; its
        consumer gets `last_item` (None: the end) so that nobody waits on a reply that is gone."""
        if not stream.finished:
            stream.finished = True
            stream.deliver(last_item)
        if stream.row is None:
            return
        last = self._streams[-1]
        if last is not stream:
            self._step.pool.move(last.row, stream.row, last.length)
            last.row = stream.row
            self._streams[stream.row] = last
        self._streams.pop()
        stream.row = None
        if not self._streams:  # idle: nothing is behind, and the next batch starts a fresh average
            self._stats.sessions = self._stats.batch_size = 0
            self._stats.behind_real_time = False
            self._stats.reply_rtf = []
            self._tick_avg = 0.0
            self._stats.tick_seconds = 0.0

    def _loop(self) -> None:
        # One intra-op thread for this thread (OpenMP keeps the setting per thread; the main thread
        # keeps its own): a frame step is hundreds of small ops, and an OpenMP team forked from a
        # thread other than the main one costs more than it saves. Measured on 2 cores, tiny preset: a
        # 16-row step 5.4 ms with one thread, 18 ms with two. The batch is the parallelism; on CUDA
        # the host thread only launches kernels.
        torch.set_num_threads(1)
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._closed and not self._jobs and not self._piecewise and not self._runnable():
                        self._wake.wait(timeout=1.0)
                    if self._closed:
                        break
                    job = self._jobs.popleft() if self._jobs and not self._piecewise else None
                started = time.perf_counter()
                if job is not None:
                    self._run_job(*job)
                elif self._piecewise:
                    self._next_piece(*self._piecewise.popleft())
                if self._runnable():
                    self._tick()
                    self._note_cycle(time.perf_counter() - started)
        for stream in list(self._streams):
            self.retire(stream, RuntimeError("the engine scheduler was closed"))
        for future in [f for _, _, f in self._jobs] + [f for _, f in self._piecewise]:
            future.set_exception(RuntimeError("the engine scheduler was closed"))

    def _run_job(self, fn: Callable, args: tuple, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting caller, never lost
            future.set_exception(exc)
            return
        if inspect.isgenerator(result):
            self._next_piece(result, future)
        else:
            future.set_result(result)

    def _next_piece(self, pieces, future: Future) -> None:
        """Run a generator job up to its next `yield`; its return value is the job's result."""
        try:
            next(pieces)
        except StopIteration as done:
            future.set_result(done.value)
        except BaseException as exc:
            future.set_exception(exc)
        else:
            self._piecewise.append((pieces, future))

    def _runnable(self) -> bool:
        return any(s.cancelled.is_set() or s.has_room for s in self._streams)

    def _note_cycle(self, seconds: float) -> None:
        s = self._stats
        fresh = self._tick_avg == 0.0
        self._tick_avg = seconds if fresh else (1 - TICK_SMOOTHING) * self._tick_avg + TICK_SMOOTHING * seconds
        s.tick_seconds = self._tick_avg
        s.behind_real_time = self._tick_avg > FRAME_SECONDS
        now = time.perf_counter()
        s.reply_rtf = [
            (now - r.started) / (r.frames_made * FRAME_SECONDS) for r in self._streams if r.frames_made
        ]

    def _tick(self) -> None:
        step = self._step
        self._think()
        planned: dict[int, torch.Tensor] = {}
        leaving: list[tuple[ReplyStream, BaseException | None]] = []
        for stream in self._streams:
            if stream.cancelled.is_set() or not stream.has_room:
                if stream.cancelled.is_set():
                    leaving.append((stream, None))
                continue
            try:
                parts = stream.steps.frame_inputs()
            except Exception as exc:
                leaving.append((stream, exc))
                continue
            if parts is not None and stream.length + parts.shape[0] > step.capacity:
                logger.warning(f"reply ended at frame {stream.steps.step}: its backbone cache of "
                               f"{step.capacity} positions is full")
                parts = None
            if parts is None:
                leaving.append((stream, None))
            else:
                planned[id(stream)] = parts
        for stream, exc in leaving:
            if exc is not None:
                self._fail(stream, exc)
            elif stream.cancelled.is_set():
                self.retire(stream)
            else:
                self._end(stream)
        # Rows are packed in `self._streams` order; a row with no room this tick rides along with a
        # dummy input whose key lands past its length (overwritten by its next real step).
        inputs, lengths, masks, picks, live = [], [], [], [], []
        for stream in self._streams:
            parts = planned.get(id(stream))
            live.append(parts is not None)
            inputs.append(parts if parts is not None else step.idle_input)
            lengths.append(stream.length)
            masks.append(stream.prompt.mask)
            do_sample, top_k, temperature, generator = stream.steps.pick
            picks.append(RowPick(do_sample, top_k, temperature, generator))
        if not any(live):
            return
        try:
            codes = step.step(inputs, lengths, masks, picks)
        except Exception as exc:
            logger.exception("engine step failed; ending every reply in this batch")
            for stream in list(self._streams):
                self._fail(stream, exc)
            return
        self._stats.ticks += 1
        self._stats.batch_size = sum(live)
        self._stats.sessions = len(self._streams)
        batch = list(self._streams)
        for stream, is_live, parts in zip(batch, live, inputs, strict=True):
            if is_live:  # all lengths first: a reply that ends below moves another row, whole
                stream.length += parts.shape[0]
        chunks: list[tuple[ReplyStream, list[torch.Tensor]]] = []
        for stream, is_live, row_codes in zip(batch, live, codes, strict=True):
            if is_live:
                try:
                    self._advance(stream, row_codes, chunks)
                except Exception as exc:
                    self._fail(stream, exc)
        self._decode_chunks(chunks)
        for stream in batch:  # after their last chunks went out
            if stream.steps.done and not stream.finished:
                self.retire(stream)

    def _think(self) -> None:
        """The thinker's next tokens for every reply that needs one this tick, decoded as one batch
        (a new reply needs `lookahead` tokens before its first frame, a running one one per two frames;
        a stream whose token filter holds tokens back needs more rounds)."""
        texting = [s for s in self._streams if not s.cancelled.is_set() and s.has_room and s.steps.wants_text()]
        try:
            while wanting := [s.steps.thinker for s in texting if s.steps.thinker.wants_decode()]:
                think_together(self.model, wanting)
        except Exception as exc:
            # Their caches may be half-updated: end these replies rather than let them go on.
            logger.exception("batched thinker step failed; ending the replies in it")
            for stream in texting:
                self._fail(stream, exc)

    def _advance(self, stream: ReplyStream, codes: torch.Tensor, chunks: list) -> None:
        frame = stream.steps.accept(codes)
        self._stats.frames += 1
        if frame is not None:
            stream.frames.append(frame)
        if len(stream.frames) >= stream.chunk_frames or (stream.steps.done and stream.frames):
            frames, stream.frames = stream.frames, []
            stream.frames_made += len(frames)
            if not stream.cancelled.is_set():
                chunks.append((stream, frames))

    def _decode_chunks(self, chunks: list[tuple[ReplyStream, list[torch.Tensor]]]) -> None:
        """The codec's audio for every chunk completed this tick, in one batched pass."""
        if not chunks:
            return
        codes = [codec_codes(self.model, torch.stack(frames)).T.unsqueeze(0) for _, frames in chunks]
        try:
            audio = decode_chunks([stream.codec for stream, _ in chunks], codes)
        except Exception as exc:
            logger.exception("codec decode failed; ending the replies whose chunks it held")
            for stream, _ in chunks:
                self._fail(stream, exc)
            return
        for (stream, frames), samples in zip(chunks, audio, strict=True):
            try:
                stream.deliver(stream.make_chunk(frames, samples[0]))
            except Exception as exc:
                self._fail(stream, exc)

    def _end(self, stream: ReplyStream) -> None:
        if stream.frames and not stream.cancelled.is_set():
            frames, stream.frames = stream.frames, []
            stream.frames_made += len(frames)
            self._decode_chunks([(stream, frames)])
        self.retire(stream)

    def _fail(self, stream: ReplyStream, exc: BaseException) -> None:
        self.retire(stream, exc)


atexit.register(FrameScheduler.close_all)
