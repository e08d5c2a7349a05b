"""The call side of call records: what each call did, handed to the `RecordWriter` as it happens.

    records = CallRecords.from_spec(spec)          # one per server: the writer, the recordings folder
    await records.start()                          # writer running; calls a crash left open are ended
    recorder = records.recorder(transport="sip", in_rate=8000, voice="demo")
    recorder.start(); recorder.event("node", name="greeting"); ...; recorder.end("caller_hung_up")
    await records.close()

Every method on the call's side only queues (records) or buffers (audio) and returns: the database and
the disk are written on threads of their own, so a slow or stopped database never holds a call.
The pipeline's two taps feed the recording and the keypad: `CallerTap` after the transport's input,
`LineTap` after its output (which passes on each chunk once written to the line).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger
from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    InputDTMFFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from processors.chroma.rates import FRAME_SECONDS  # replies are counted in the model's frames
from records.model import CallEvent, CallInfo
from records.recording import CallRecording, drain_recordings
from records.retention import prune
from records.store import CallStore, open_store
from records.writer import RecordWriter
from transports.line import Playout

MAX_TEXT = 4000  # characters of one value kept in an event (a tool's result can be anything)


def new_record_id() -> str:
    """A record id unique across restarts and servers, sortable by time: 20261206-101500-3fa9c1d2."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)


def jsonable(value: Any) -> Any:
    """`value` as JSON can hold it: what JSON cannot is kept as its repr, long text is cut."""
    if isinstance(value, str):
        return value if len(value) <= MAX_TEXT else value[:MAX_TEXT] + "…"
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return jsonable(repr(value))


@dataclass
class RecordsConfig:
    database: str  # a path or a URL, as open_store takes it
    recordings: Path | None
    retention_days: int | None
    agent: str


class CallRecords:
    """A server's records: one RecordWriter for all its calls, and where recordings go."""

    def __init__(
        self,
        config: RecordsConfig,
        *,
        store_factory: Callable[[], CallStore] | None = None,
        max_queue: int = 10_000,
    ):
        self.config = config
        self._open = store_factory or (lambda: open_store(config.database))
        self.writer = RecordWriter(self._open, max_queue=max_queue)
        # Which server took each call: a restarted server ends (as a crash) only the calls it left open,
        # not the live calls of others sharing the database. `serve` adds its port.
        self.server = socket.gethostname()
        self._started_at = time.time()
        self._started = False
        self._writing = False

    @classmethod
    def from_spec(cls, spec) -> CallRecords | None:
        """None when the agent file turns records off."""
        records = spec.records
        if not records.enabled:
            return None
        base = spec.path.parent
        return cls(
            RecordsConfig(
                database=records.database_url(base),
                recordings=records.recordings_folder(base),
                retention_days=records.retention_days,
                agent=spec.name,
            )
        )

    async def start(self) -> None:
        """Start the writer; end the calls a killed server left open (as `crash`); apply retention.
        A database that cannot be reached now is logged: calls go on, their records queue."""
        if self._started:
            return
        self._started = self._writing = True
        self._started_at = time.time()
        await self.writer.start()
        try:
            await asyncio.wait_for(asyncio.to_thread(self._housekeeping), timeout=30)
        except Exception as exc:
            logger.opt(exception=exc).warning(
                f"call records at {_safe(self.config.database)}: could not end unfinished calls or apply "
                f"retention now ({exc!r}); new calls are recorded when the database answers"
            )

    def _housekeeping(self) -> None:
        store = self._open()
        try:
            crashed = store.mark_unfinished("crash", server=self.server, started_before=self._started_at)
            if crashed:
                logger.warning(f"call records: {len(crashed)} calls left open by a stopped server marked ended by a crash")
            if self.config.retention_days is not None:
                prune(store, self.config.retention_days)  # logs what it deleted
        finally:
            store.close()

    async def close(self) -> None:
        await asyncio.to_thread(drain_recordings, 5.0)
        await self.writer.close()

    def recorder(
        self,
        *,
        transport: str,
        in_rate: int,
        voice: str | None = None,
        sensitive: Callable[[str], bool] = lambda node: False,
    ) -> CallRecorder:
        if not self._writing:  # a runtime used without the server (a test, a scenario run): writing only
            try:
                asyncio.get_running_loop().create_task(self.writer.start())
                self._writing = True
            except RuntimeError:  # no event loop yet: the first call made in one starts the writer
                pass
        record_id = new_record_id()
        recording = None
        if self.config.recordings is not None:
            recording = CallRecording(self.config.recordings / f"{record_id}.wav", in_rate)
        info = CallInfo(
            call_id=record_id,
            agent=self.config.agent,
            transport=transport,
            started_at=time.time(),
            voice=voice,
            recording=str(recording.path) if recording is not None else None,
            server=self.server,
        )
        return CallRecorder(self.writer, info, recording=recording, sensitive=sensitive)

    def refused(
        self, transport: str, reason: str, *, transport_ids: dict[str, str] | None = None,
        caller: str | None = None, callee: str | None = None,
    ) -> str:
        """A call turned away as busy: a record that starts and ends at once. Returns its id."""
        now = time.time()
        info = CallInfo(
            call_id=new_record_id(), agent=self.config.agent, transport=transport, started_at=now,
            transport_ids={k: str(v)[:200] for k, v in (transport_ids or {}).items() if v},
            caller=caller or None, callee=callee or None, server=self.server,
        )  # fmt: skip
        self.writer.start_call(info)
        self.writer.end_call(info.call_id, now, "busy", reason)
        return info.call_id

    def gauges(self) -> Iterable[tuple[str, str, float]]:
        w = self.writer
        yield "chroma_records_pending", "Call record writes queued, not yet in the database.", w.pending

    def counters(self) -> Iterable[tuple[str, str, float]]:
        w = self.writer
        yield "chroma_records_written_total", "Call record writes stored in the database.", w.written
        yield "chroma_records_lost_total", "Call record writes lost: queue full, refused, or unwritten at shutdown.", w.lost
        yield "chroma_records_errors_total", "Failed calls to the records database (each retried).", w.errors

    # -- reading (the web view) -------------------------------------------------------------------

    async def read(self, what: Callable[[CallStore], Any], timeout: float = 10.0) -> Any:
        """Run `what(store)` on a store of its own, off the event loop."""

        def run():
            store = self._open()
            try:
                return what(store)
            finally:
                store.close()

        return await asyncio.wait_for(asyncio.to_thread(run), timeout)


def _safe(url: str) -> str:
    """A database URL without its password, for logs."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


class CallRecorder:
    """One call's record. Events are numbered in the order they happen and stamped with wall time."""

    def __init__(
        self,
        writer: RecordWriter,
        info: CallInfo,
        *,
        recording: CallRecording | None = None,
        sensitive: Callable[[str], bool] = lambda node: False,
    ):
        self.writer = writer
        self.info = info
        self.recording = recording
        self._sensitive = sensitive
        self._seq = 0
        self._started = False
        self._ended = False
        self._in_sensitive_node = False
        self._turn = 0
        self._reply_seconds = 0.0
        self._cut: tuple[int, int] | None = None  # (heard, sent) frames of the reply a barge-in cut
        self._caller_turn_at: float | None = None
        self._tools: dict[str, tuple[str, float]] = {}  # id -> (name, monotonic start)
        self._audio_failed = False

    @property
    def record_id(self) -> str:
        return self.info.call_id

    def identify(
        self, transport_ids: dict[str, str] | None = None, *, caller: str | None = None, callee: str | None = None
    ) -> None:
        """Who the call is between, by the transport's own ids; before start() it goes in the first row."""
        ids = {k: str(v)[:200] for k, v in (transport_ids or {}).items() if v}
        self.info.transport_ids.update(ids)
        if caller:
            self.info.caller = str(caller)[:200]
        if callee:
            self.info.callee = str(callee)[:200]
        if self._started:
            self.writer.update_call(
                self.record_id, transport_ids=dict(self.info.transport_ids), caller=self.info.caller,
                callee=self.info.callee,
            )  # fmt: skip

    def start(self) -> None:
        if not self._started:
            self._started = True
            self.writer.start_call(self.info)

    def answered(self) -> None:
        self.info.answered_at = time.time()
        self.writer.update_call(self.record_id, answered_at=self.info.answered_at)

    def event(self, kind: str, **data: Any) -> None:
        if self._ended:
            return
        self.writer.add_event(CallEvent(self.record_id, self._seq, time.time(), kind, data))
        self._seq += 1

    def end(self, reason: str, detail: str | None = None) -> None:
        if self._ended:
            return
        if self.recording is not None:
            self._audio(self.recording.close)
        self._ended = True
        self.info.ended_at, self.info.end_reason, self.info.end_detail = time.time(), reason, detail
        self.writer.end_call(self.record_id, self.info.ended_at, reason, detail)

    # -- what the call's handlers report ---------------------------------------------------------

    def note(self, kind: str, data: dict) -> None:
        """One of the call's own timeline entries (agent/runtime.py `Call.note`)."""
        if kind == "user_speaking":
            if data.get("speaking"):
                self._caller_turn_at = time.monotonic()
                self.event("caller_turn_started")
            else:
                began, self._caller_turn_at = self._caller_turn_at, None
                seconds = round(time.monotonic() - began, 3) if began is not None else None
                self.event("caller_turn_ended", audio_seconds=seconds)
        elif kind == "agent_text":
            self._reply(data)
        elif kind == "node":
            self.node(data["name"])
        elif kind in ("tool_call", "tool_result"):
            return  # recorded with their ids by tool_call() / tool_result()
        else:
            self.event(kind, **jsonable(data))

    def reply_started(self, turn: int) -> None:
        self._turn, self._reply_seconds, self._cut = turn, 0.0, None
        self.event("reply_started", turn=turn)

    def first_audio(self, seconds: float) -> None:
        self.event("first_audio", turn=self._turn, seconds=round(seconds, 3))

    def reply_progress(self, seconds: float) -> None:
        self._reply_seconds = seconds

    def barge_in(self, heard_frames: int, sent_frames: int) -> None:
        self._cut = (heard_frames, sent_frames)
        self.event("barge_in", turn=self._turn, heard_frames=heard_frames, sent_frames=sent_frames)

    def _reply(self, data: dict) -> None:
        interrupted = bool(data.get("interrupted"))
        sent = round(self._reply_seconds / FRAME_SECONDS)
        heard = sent
        if interrupted and self._cut is not None:
            heard, sent = self._cut
        self.event(
            "agent_reply", turn=self._turn, text=jsonable(data.get("sent_text") or data.get("text") or ""),
            heard_text=jsonable(data.get("text") or ""), interrupted=interrupted, frames=sent, heard_frames=heard,
        )  # fmt: skip

    def node(self, name: str) -> None:
        self._in_sensitive_node = bool(self._sensitive(name))
        if self.recording is not None:
            self.recording.caller_muted = self._in_sensitive_node
        self.event("node", name=name, sensitive=self._in_sensitive_node)

    def tool_call(self, call_id: str, name: str, arguments: dict) -> None:
        self._tools[call_id] = (name, time.monotonic())
        self.event("tool_call", id=call_id, name=name, arguments=jsonable(arguments))

    def tool_result(self, call_id: str, result: Any) -> None:
        name, began = self._tools.pop(call_id, (None, None))
        error = result.get("error") if isinstance(result, dict) else None
        self.event(
            "tool_result", id=call_id, name=name, result=jsonable(result),
            seconds=round(time.monotonic() - began, 3) if began is not None else None,
            error=jsonable(error) if error is not None else None,
        )  # fmt: skip

    def keypad(self, key: str) -> None:
        """A key the caller pressed; '*' for each one in a sensitive node."""
        self.event("keypad", key="*" if self._in_sensitive_node else key, redacted=self._in_sensitive_node)

    # -- audio (the taps) --------------------------------------------------------------------------

    def caller_audio(self, pcm: bytes, rate: int) -> None:
        if self.recording is not None and not self._audio_failed:
            self._audio(self.recording.caller, pcm, rate)

    def agent_audio(self, pcm: bytes, rate: int) -> None:
        if self.recording is not None and not self._audio_failed:
            self._audio(self.recording.agent, pcm, rate)

    def agent_cleared(self, unplayed_seconds: float) -> None:
        if self.recording is not None and not self._audio_failed and unplayed_seconds > 0:
            self._audio(self.recording.cut_agent, unplayed_seconds)

    def _audio(self, method, *args) -> None:
        # A recording that fails stops; the call never does.
        try:
            method(*args)
        except Exception:
            self._audio_failed = True
            logger.exception(f"call record {self.record_id}: recording failed; the call goes on unrecorded")


class CallerTap(FrameProcessor):
    """After the transport's input: the caller's audio into the recording, their keys into the record."""

    def __init__(self, recorder: CallRecorder, **kwargs):
        super().__init__(enable_direct_mode=True, **kwargs)
        self._recorder = recorder
        self._audio = recorder.recording is not None

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if self._audio and isinstance(frame, InputAudioRawFrame):
            self._recorder.caller_audio(frame.audio, frame.sample_rate)
        elif isinstance(frame, InputDTMFFrame):
            self._recorder.keypad(frame.button.value)
        await self.push_frame(frame, direction)


class LineTap(FrameProcessor):
    """After the transport's output, which passes each chunk on once written: the agent's side of the
    recording. `playout`: the call's account of what was heard (processors.playout's CallPlayout), which
    says how much a barge-in cleared unheard."""

    def __init__(self, recorder: CallRecorder, playout: Playout, **kwargs):
        super().__init__(enable_direct_mode=True, **kwargs)
        self._recorder = recorder
        self._playout = playout

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, OutputAudioRawFrame):
            self._recorder.agent_audio(frame.audio, frame.sample_rate)
        elif isinstance(frame, InterruptionFrame):
            self._recorder.agent_cleared(self._playout.unplayed_seconds())
        await self.push_frame(frame, direction)

