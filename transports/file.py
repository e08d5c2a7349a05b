"""A simulated call for tests and batch use: the caller's audio is played into the pipeline in real
time, and the agent's audio is recorded on the same timeline, silences included.

The caller can also act while the call runs (`play` more audio, `press` keys), and what the agent
does besides speaking (DTMF it sends, a transfer it asks for) is logged in `events`."""

from __future__ import annotations

import asyncio
from collections import deque

import numpy as np
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    InputDTMFFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputDTMFFrame,
    OutputDTMFUrgentFrame,
    StartFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.transports.base_input import BaseInputTransport
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import BaseTransport, TransportParams

from processors.audio import SUPPORTED_RATES, StreamResampler
from processors.audio_io import to_pcm16

from .line import PLAYS_AS_WRITTEN


class _CallClock:
    """Seconds since the call started, shared by both directions."""

    def __init__(self):
        self.t0: float | None = None

    def now(self) -> float:
        loop = asyncio.get_running_loop()
        if self.t0 is None:
            self.t0 = loop.time()
        return loop.time() - self.t0

    async def sleep_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            await asyncio.sleep(delay)


class FileInputTransport(BaseInputTransport):
    def __init__(self, transport: FileCallTransport, params: TransportParams):
        super().__init__(params)
        self._call = transport
        self._feeder: asyncio.Task | None = None

    async def start(self, frame: StartFrame):
        await super().start(frame)
        await self.set_transport_ready(frame)
        if self._feeder is None:
            self._feeder = self.create_task(self._feed(), "file-caller")

    async def stop(self, frame):
        await self._stop_feeder()
        await super().stop(frame)

    async def cancel(self, frame):
        await self._stop_feeder()
        await super().cancel(frame)

    async def _stop_feeder(self):
        if self._feeder is not None:
            await self.cancel_task(self._feeder)
            self._feeder = None

    async def _feed(self):
        """The caller's audio, then line silence (a phone line never goes quiet-as-nothing; VAD needs
        frames to notice the end of speech) until the call is ended."""
        call, rate = self._call, self.sample_rate
        resampler = StreamResampler(call.caller_rate, rate)
        step = call.frame_ms / 1000
        per_frame = call.caller_rate * call.frame_ms // 1000
        clock = call.clock
        i = 0
        while True:
            await clock.sleep_until(i * step)
            chunk = call._take(per_frame)
            if chunk.size == 0 and not call.caller_done.is_set():
                call.caller_done.set()
                await self._call._call_event_handler("on_caller_finished")
            if chunk.size < per_frame:
                chunk = np.pad(chunk, (0, per_frame - chunk.size))
            audio = resampler.process(chunk.tobytes())
            await self.push_audio_frame(InputAudioRawFrame(audio=audio, sample_rate=rate, num_channels=1))
            i += 1


class FileOutputTransport(BaseOutputTransport):
    def __init__(self, transport: FileCallTransport, params: TransportParams):
        super().__init__(params)
        self._call = transport

    async def start(self, frame: StartFrame):
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        if isinstance(frame, InterruptionFrame):
            self._call.events.append(("interruption", self._call.clock.now()))
        await super().process_frame(frame, direction)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        # A device with no playout buffer: a chunk starts when written (or when the previous one
        # ends) and the write returns once it has played, so "written" means "heard".
        call = self._call
        samples = np.frombuffer(frame.audio, np.int16)
        start = max(call.clock.now(), call.cursor)
        call.agent_chunks.append((start, frame.sample_rate, samples.copy()))
        call.events.append(("agent_audio", start))
        call.cursor = start + samples.size / frame.sample_rate
        await call.clock.sleep_until(call.cursor)
        return True

    def _supports_native_dtmf(self) -> bool:
        return True  # logged as a key press, not played as tones

    async def _write_dtmf_native(self, frame: OutputDTMFFrame | OutputDTMFUrgentFrame):
        self._call.events.append(("dtmf_out", self._call.clock.now(), frame.button.value))


class FileCallTransport(BaseTransport):
    """A transports.line.Line that plays as it writes. Events: on_caller_finished(transport) once the
    caller's audio has all been sent.

    `caller_pcm`: int16, or float in [-1, 1], at `caller_rate`, one of processors.audio.SUPPORTED_RATES
    (a file at another rate is resampled when read: processors.audio_io.read_audio). `in_rate`: the rate
    the call listens at (the VAD's: 8000 or 16000). `kind`: what the call counts as ("file")."""

    can_transfer = True
    playout = PLAYS_AS_WRITTEN

    def __init__(
        self,
        caller_pcm: np.ndarray,
        caller_rate: int,
        *,
        output_rate: int = 24000,
        frame_ms: int = 20,
        in_rate: int = 16000,
        kind: str = "file",
    ):
        super().__init__()
        # Checked here, not when the caller's task first resamples: there it would only end the call.
        if caller_rate not in SUPPORTED_RATES:
            raise ValueError(f"caller_rate is {caller_rate} Hz, expected one of {SUPPORTED_RATES}")
        self.kind = kind
        self.in_rate = in_rate
        self.caller_pcm = to_pcm16(np.asarray(caller_pcm).reshape(-1))
        self._pending: deque[np.ndarray] = deque([self.caller_pcm])  # caller audio not yet sent
        self.caller_rate = caller_rate
        self.output_rate = output_rate
        self.frame_ms = frame_ms
        self.clock = _CallClock()
        self.cursor = 0.0
        self.caller_done = asyncio.Event()
        self.agent_chunks: list[tuple[float, int, np.ndarray]] = []
        self.events: list[tuple] = []  # (kind, seconds, *details)
        self._params = TransportParams(
            audio_in_enabled=True,
            audio_out_enabled=True,
            audio_out_sample_rate=output_rate,
            audio_out_10ms_chunks=frame_ms // 10,
            audio_out_end_silence_secs=0,
        )
        self._input = FileInputTransport(self, self._params)
        self._output = FileOutputTransport(self, self._params)
        self._register_event_handler("on_caller_finished")

    def input(self) -> FileInputTransport:
        return self._input

    def output(self) -> FileOutputTransport:
        return self._output

    @property
    def out_rate(self) -> int:
        return self.output_rate

    def _take(self, samples: int) -> np.ndarray:
        parts, need = [], samples
        while need and self._pending:
            head = self._pending[0]
            parts.append(head[:need])
            need -= parts[-1].size
            if head.size <= parts[-1].size:
                self._pending.popleft()
            else:
                self._pending[0] = head[parts[-1].size :]
        return np.concatenate(parts) if parts else np.zeros(0, np.int16)

    @property
    def caller_busy(self) -> bool:
        """Caller audio is still waiting to be sent."""
        return any(p.size for p in self._pending)

    def play(self, pcm: np.ndarray) -> float:
        """The caller says more: int16 audio at caller_rate, sent after what is already waiting.
        Returns when (call seconds) it starts."""
        waiting = sum(p.size for p in self._pending) / self.caller_rate
        self._pending.append(np.asarray(pcm, np.int16).reshape(-1))
        return self.clock.now() + waiting

    async def press(self, digits: str) -> None:
        """The caller presses keys (0-9, *, #, A-D)."""
        for digit in digits:
            self.events.append(("dtmf_in", self.clock.now(), digit))
            await self._input.push_frame(InputDTMFFrame(button=KeypadEntry(digit)))

    async def hang_up(self) -> None:
        """The agent's side ending the line: logged (ending the pipeline ends the simulated call)."""
        self.events.append(("hang_up", self.clock.now()))

    async def transfer(self, target: str) -> bool:
        """A flow's transfer_call: logged; the simulated line always accepts."""
        self.events.append(("transfer", self.clock.now(), target))
        return True

    def recording(self, duration: float | None = None) -> np.ndarray:
        """The agent's side of the call as int16 at output_rate, silence where it did not speak."""
        end = max((t + s.size / r for t, r, s in self.agent_chunks), default=0.0)
        total = int(round(max(end, duration or 0.0) * self.output_rate))
        out = np.zeros(total, np.int16)
        for t, rate, samples in self.agent_chunks:
            if rate != self.output_rate:
                raise ValueError(f"agent audio at {rate} Hz, expected the call's {self.output_rate} Hz")
            i = int(round(t * self.output_rate))
            out[i : i + samples.size] = samples[: max(0, total - i)]
        return out
