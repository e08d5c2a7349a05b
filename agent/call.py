"""One call: its pipeline on a line, its engine session, its flow, its record, and what it did.

    call = runtime.new_call(line)           # agent/runtime.py builds it; the line is a transports.line.Line
    stats = await call.run()                # returns when the call ends; frees the session

A call's frames:  line.input → [record caller → outbound screen → keypad → flow] → user turn (VAD +
                  end of turn) → ChromaS2SService → line.output → [record agent] → PlayoutTracker
                  → assistant context
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loguru import logger
from pipecat.flows import FlowManager
from pipecat.frames.frames import EndFrame, OutputTransportMessageUrgentFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.utils.asyncio.task_manager import TaskManager
from pipecat.workers.runner import WorkerRunner

from flows.dtmf import DTMFInput
from flows.runtime import CallFlow
from processors.chroma.remote import RemoteSession
from processors.chroma.service import CallActionFrame, ChromaS2SService
from processors.playout import with_playout
from processors.turn import user_turn_strategies
from processors.vad import make_vad_analyzer
from records.recorder import CallerTap, CallRecorder, LineTap
from transports.line import Line

from .call_control import PipelineCallControl

if TYPE_CHECKING:
    from .runtime import AgentRuntime

# How often the page hears how a reply is going (its text and length so far), at most.
PROGRESS_EVERY_SECS = 0.5
# A call whose engine connection was lost has this long to say its goodbye before it is ended anyway.
LOST_ENGINE_END_SECS = 20.0


@dataclass
class CallStats:
    call_id: str
    kind: str
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    turns: int = 0
    barge_ins: int = 0
    failed_turns: int = 0  # replies the model failed on
    ttfa: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    cut_replies: list[tuple[int, int]] = field(default_factory=list)  # (frames heard, frames sent) per barge-in

    def summary(self) -> str:
        duration = (self.ended or time.monotonic()) - self.started
        ttfa = ", ".join(f"{t * 1000:.0f}" for t in self.ttfa) or "-"
        return (
            f"call {self.call_id} ({self.kind}) ended: {duration:.1f} s, {self.turns} turns, "
            f"{self.barge_ins} barge-ins, time to first audio per turn (ms): {ttfa}"
        )


class CallTasks(TaskManager):
    """The task manager of one call: a task that fails is reported to `on_failure` (which ends the
    call) instead of only being logged, as pipecat's own does, while the call waits on for it."""

    def __init__(self, on_failure: Callable[[str, BaseException], None]):
        super().__init__(loop=asyncio.get_running_loop())
        self._on_failure = on_failure

    def create_task(self, coroutine, name: str, context=None) -> asyncio.Task:
        async def reported():
            try:
                return await coroutine
            except Exception as exc:
                self._on_failure(name, exc)

        return super().create_task(reported(), name, context)


class Call:
    """Built by `AgentRuntime.new_call(line)`: the line gives the call its kind and both audio rates."""

    def __init__(self, runtime: AgentRuntime, line: Line, call_id: str, screen: FrameProcessor | None = None):
        spec = runtime.spec
        self.runtime = runtime
        self.line = line
        kind, in_rate, out_rate = line.kind, line.in_rate, line.out_rate
        self.stats = CallStats(call_id, kind)

        # What the call did besides talking (flows): read by tests and conversation reports.
        self.flow_state: dict = {}  # seeds the flow's state: the caller's number and the like
        self.tool_calls: list[tuple[str, dict]] = []
        self.dtmf_sent: list[str] = []
        self.transferred_to: str | None = None
        self.ended_by_agent = False
        self.placed = None  # agent.outbound.PlacedCall when the agent placed this call
        self._flow_start: asyncio.Task | None = None
        # What went wrong, one line each: a task of the call that failed (and so ended the call).
        self.errors: list[str] = []
        self._ending: asyncio.Task | None = None
        # (time.monotonic(), kind, data) of what the agent side saw and did: the conversation tests'
        # agent-side events. Kinds: user_speaking, tool_call, tool_result, node, agent_text, dtmf_sent,
        # transferred, agent_hung_up, turn_failed.
        self.timeline: list[tuple[float, str, dict]] = []
        self.flow = CallFlow(spec.flow_file, PipelineCallControl(self)) if spec.flow_file is not None else None
        if self.flow is not None:
            self.flow.on_node = lambda name: self.note("node", name=name)
        self.cancel_reason: str | None = None
        self.recorder: CallRecorder | None = None
        if runtime.records is not None:
            dtmf = spec.flow_file.dtmf if spec.flow_file is not None else {}
            self.recorder = runtime.records.recorder(
                transport=kind,
                in_rate=in_rate,
                voice=spec.voice_folder.name,
                sensitive=lambda node: node in dtmf and dtmf[node].sensitive,
            )
            self.recorder.identify({"call_id": call_id})
        vad = make_vad_analyzer(
            spec.vad.analyzer,
            aggressiveness=spec.vad.aggressiveness,
            frame_ms=spec.vad.frame_ms,
            confidence=spec.vad.confidence,
            start_secs=spec.vad.start_secs,
            stop_secs=spec.vad.stop_secs,
            min_volume=spec.vad.min_volume,
        )
        strategies = user_turn_strategies(
            spec.turn.detector,
            silence_secs=spec.turn.silence_secs,
            max_silence_secs=spec.turn.silence_secs,
            enable_interruptions=spec.response.allow_interruptions,
        )
        messages = [{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else []
        self.context = LLMContext(messages=messages)
        self.service = ChromaS2SService(
            runtime.new_session(),
            context=self.context,
            out_rate=out_rate,
            model_error=runtime.model_error_audio,
            name=f"chroma-{call_id}",
        )
        self.aggregators = LLMContextAggregatorPair(
            self.context,
            user_params=LLMUserAggregatorParams(vad_analyzer=vad, user_turn_strategies=strategies),
        )
        output, tracker = with_playout(line)
        pipeline = Pipeline(
            [
                line.input(),
                *([CallerTap(self.recorder)] if self.recorder is not None else []),
                *([screen] if screen is not None else []),
                *([DTMFInput(self.flow.digits)] if self.flow is not None else []),
                self.aggregators.user(),
                self.service,
                output,
                *(
                    [LineTap(self.recorder, tracker.playout)]
                    if self.recorder is not None and self.recorder.recording is not None
                    else []
                ),
                tracker,
                self.aggregators.assistant(),
            ]
        )
        # Only what a call uses: pipecat's default observers cost a copy of every frame each.
        self.worker = PipelineWorker(
            pipeline,
            params=PipelineParams(
                audio_in_sample_rate=in_rate, audio_out_sample_rate=out_rate, enable_metrics=True
            ),
            enable_turn_tracking=False,
            enable_rtvi=False,
            idle_timeout_secs=None,
            conversation_id=call_id,
        )
        self._wire_events()
        if isinstance(self.service.session, RemoteSession):
            self.service.session.on_lost = self._engine_lost
        if self.flow is not None:
            self._start_flow()

    def _engine_lost(self, reason: str) -> None:
        """The remote engine can no longer serve this call: it ends the way a failing model ends a call
        (response.on_model_error's goodbye, then hang-up), at once rather than after several turns, and
        within LOST_ENGINE_END_SECS whatever becomes of the goodbye."""
        self.note("engine_lost", reason=reason)
        service = self.service
        if service.model_error is not None:
            service.model_error = dataclasses.replace(service.model_error, hang_up_after=1)
        loop = asyncio.get_running_loop()
        if not service.speaking:  # no reply under way to fail: ask for one, which fails at once
            goodbye = self.runtime.spec.response.on_model_error.goodbye
            loop.create_task(self.worker.queue_frame(CallActionFrame(say=goodbye)))

        def end_now() -> None:
            if self.stats.ended is None and self._ending is None:
                self._ending = loop.create_task(self.cancel(reason="the engine connection was lost"))

        loop.call_later(LOST_ENGINE_END_SECS, end_now)

    def _start_flow(self) -> None:
        manager = FlowManager(
            worker=self.worker,
            llm=self.service,
            context_aggregator=self.aggregators,
            transport=self.line,
            global_functions=self.flow.global_functions,
        )

        async def start() -> None:
            try:
                await self.flow.start(manager, state=self.flow_state)
            except Exception:
                logger.exception(f"call {self.stats.call_id}: the flow could not start; ending the call")
                await self.hang_up()

        @self.worker.event_handler("on_pipeline_started")
        async def _started(_worker, _frame):
            if self.placed is None:
                await start()
                return
            # A call the agent placed: the callee speaks first, so the flow (whose first node may speak at
            # once) starts when a person has answered; for a machine, outbound.on_machine acts instead.
            async def start_for_a_person() -> None:
                if await self.placed.person_answered():
                    await start()

            self._flow_start = asyncio.create_task(start_for_a_person(), name=f"flow-{self.stats.call_id}")

    def _wire_events(self):
        stats, metrics, service, recorder = self.stats, self.runtime.metrics, self.service, self.recorder

        @service.event_handler("on_turn_started")
        async def _turn(_service, turn):
            stats.turns = turn
            metrics.turn()
            if recorder is not None:
                recorder.reply_started(turn)

        @service.event_handler("on_first_audio")
        async def _first_audio(_service, seconds):
            stats.ttfa.append(seconds)
            metrics.first_audio(seconds)
            if recorder is not None:
                recorder.first_audio(seconds)
            await self.tell_client({"event": "ttfa", "turn": stats.turns, "ms": round(seconds * 1000)})

        told = {"turn": 0, "seconds": 0.0}  # the reply the page last heard about, and how far

        @service.event_handler("on_reply_progress")
        async def _progress(_service, text, seconds):
            if recorder is not None:
                recorder.reply_progress(seconds)
            # The page's transcript fills as the reply goes, not only once it ends (a long reply, or
            # the caller hanging up first, would leave it empty).
            if told["turn"] != stats.turns or seconds - told["seconds"] >= PROGRESS_EVERY_SECS:
                told.update(turn=stats.turns, seconds=seconds)
                await self.tell_client({"event": "reply", "turn": stats.turns, "text": text, "seconds": seconds})

        @service.event_handler("on_turn_finished")
        async def _finished(_service, text, interrupted):
            stats.texts.append(text)
            if not interrupted:  # a cut reply is noted once the caller's side says what it heard
                self.note("agent_text", text=text, interrupted=False, sent_text=service.sent_text)
            await self.tell_client({"event": "text", "turn": stats.turns, "text": text, "interrupted": interrupted})

        @service.event_handler("on_turn_failed")
        async def _failed(_service, error, in_row, hanging_up):
            stats.failed_turns += 1
            metrics.turn_failed()
            self.note("turn_failed", error=repr(error), in_row=in_row)
            if hanging_up:
                self.ended_by_agent = True
                self.note("agent_hung_up")
            await self.tell_client({"event": "turn_failed", "turn": stats.turns, "in_row": in_row})

        @service.event_handler("on_input_dropped")
        async def _dropped(_service, reason):
            metrics.dropped(reason)

        @service.event_handler("on_tool_call")
        async def _tool_call(_service, call):
            self.tool_calls.append((call.name, dict(call.arguments)))
            self.note("tool_call", name=call.name, arguments=dict(call.arguments))
            if recorder is not None:
                recorder.tool_call(call.call_id, call.name, dict(call.arguments))

        @service.event_handler("on_tool_result")
        async def _tool_result(_service, call_id, result):
            self.note("tool_result", call_id=call_id)
            if recorder is not None:
                recorder.tool_result(call_id, result)

        @service.event_handler("on_user_speaking")
        async def _user_speaking(_service, speaking):
            self.note("user_speaking", speaking=speaking)

        @service.event_handler("on_barge_in")
        async def _barge_in(_service, heard_frames, sent_frames):
            stats.barge_ins += 1
            stats.cut_replies.append((heard_frames, sent_frames))
            if recorder is not None:
                recorder.barge_in(heard_frames, sent_frames)
            kept = service.session.kept_text
            self.note("agent_text", text=kept, interrupted=True, sent_text=service.sent_text)
            metrics.barge_in()
            await self.tell_client({"event": "barge_in", "count": stats.barge_ins, "heard_frames": heard_frames})

    def note(self, kind: str, **data) -> None:
        self.timeline.append((time.monotonic(), kind, data))
        if self.recorder is not None:
            self.recorder.note(kind, data)

    def identify(self, transport_ids: dict[str, str], *, caller: str | None = None, callee: str | None = None):
        """The transport's own ids for this call (Twilio CallSid, SIP Call-ID) and its two ends, for its
        record; called before run()."""
        if self.recorder is not None:
            self.recorder.identify(transport_ids, caller=caller, callee=callee)

    @property
    def record_id(self) -> str | None:
        """This call's record (`chroma-agent calls show ID`), or None when records are off."""
        return self.recorder.record_id if self.recorder is not None else None

    def end_reason(self) -> tuple[str, str | None]:
        """Why the call ended, as its record says: (reason, detail)."""
        if self.errors:
            return "error", self.errors[0]
        if self.transferred_to is not None:
            return "transferred", self.transferred_to
        if self.ended_by_agent:
            return "agent_ended", None
        if self.runtime.shutting_down:
            return "shutdown", self.cancel_reason
        return "caller_hung_up", self.cancel_reason

    async def set_voice(self, ref: str) -> None:
        """Speak from the next reply on in another voice (a flow node's hand-off); memory carries over."""
        await self.service.set_voice(self.runtime.find_voice(ref))
        logger.info(f"call {self.stats.call_id}: next reply in voice {ref!r}")

    async def tell_client(self, message: dict) -> None:
        """A small JSON event for the client (the web page's transcript and readouts); transports
        without a message channel ignore it."""
        await self.worker.queue_frame(OutputTransportMessageUrgentFrame(message={"type": "chroma-agents", **message}))

    async def hang_up(self) -> None:
        """End the call after what is queued has been sent."""
        await self.worker.queue_frame(EndFrame())

    async def cancel(self, reason: str | None = None) -> None:
        """End the call now (the client is gone: nothing more can be delivered)."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        await self.worker.cancel(reason=reason)

    def _task_failed(self, task_name: str, exc: BaseException) -> None:
        """A task of this call raised: nothing would carry on its work (feeding the caller's audio,
        generating a reply), so the call ends now rather than waiting on it for ever."""
        self.errors.append(f"{task_name}: {type(exc).__name__}: {exc}")
        logger.opt(exception=exc).error(f"call {self.stats.call_id}: task {task_name} failed: {exc}; ending the call")
        if self._ending is None:
            self._ending = asyncio.get_running_loop().create_task(self.cancel(reason=f"task {task_name} failed"))

    async def run(self) -> CallStats:
        """Returns when the call ends: hung up, cancelled, or a task of it failed (see `errors`)."""
        metrics = self.runtime.metrics
        metrics.call_started(self.stats.kind)
        record = f", record {self.record_id}" if self.recorder is not None else ""
        logger.info(f"call {self.stats.call_id} ({self.stats.kind}) started{record}")
        if self.recorder is not None:
            self.recorder.start()
            self.recorder.answered()
        runner = WorkerRunner(
            name=f"call-{self.stats.call_id}", handle_sigint=False, task_manager=CallTasks(self._task_failed)
        )
        await runner.add_workers(self.worker)
        try:
            await runner.run()
        finally:
            self.stats.ended = time.monotonic()
            metrics.call_ended()
            self.runtime.calls.pop(self.stats.call_id, None)
            self.service.session.cancel()
            if self._flow_start is not None:
                self._flow_start.cancel()
            if isinstance(self.service.session, RemoteSession):
                self.service.session.close()  # the engine frees the call's session
            if self.recorder is not None:
                self.recorder.end(*self.end_reason())
            logger.info(self.stats.summary())
        return self.stats
