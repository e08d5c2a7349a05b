"""The agent at run time: one model per process, one pipeline and one engine session per call.

    runtime = AgentRuntime(load_agent("agent.yaml"))      # loads the model once
    call = runtime.new_call(transport, kind="webrtc")     # any pipecat transport
    stats = await call.run()                              # returns when the call ends; frees the session

A call's frames:  transport.input → [record caller → outbound screen → keypad → flow] → user turn (VAD +
                  end of turn) → ChromaS2SService → transport.output → [record agent] → PlayoutTracker
                  → assistant context

With a flow file (`flow:` in the agent file) each call runs its own pipecat `FlowManager` from the
moment its pipeline starts, with the flow's tools and telephony actions bound to that call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.file_download import _CACHED_NO_EXIST
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
from pipecat.transports.base_transport import BaseTransport
from pipecat.utils.asyncio.task_manager import TaskManager
from pipecat.workers.runner import WorkerRunner

from flows.dtmf import DTMFInput
from flows.runtime import CallFlow
from processors.chroma.checkpoint import load_model
from processors.chroma.config import LISTEN_RATE, SAMPLE_RATE
from processors.chroma.generation import Sampling, ThinkerStream
from processors.chroma.modeling import ChromaModel
from processors.chroma.remote import RemoteEngine, RemoteSession
from processors.chroma.scheduler import FrameScheduler
from processors.chroma.service import (
    FRAME_SECONDS,
    CallActionFrame,
    ChromaS2SService,
    ModelErrorAudio,
    render_line,
)
from processors.playout import with_playout
from processors.turn import user_turn_strategies
from processors.vad import make_vad_analyzer
from records.recorder import CallerTap, CallRecorder, CallRecords, LineTap
from voices.profile import load_voice

from .call_control import PipelineCallControl
from .metrics import ServerMetrics
from .spec import AgentSpec

STAND_IN_NOTICE = (
    "model 'tiny' is a seeded random miniature of Chroma: the agent hears and answers, but its voice "
    "is an untrained stand-in (noise), not speech. Real speech needs the real weights "
    "(FlashLabs/Chroma-4B, best on a GPU) or a checkpoint folder."
)

_call_ids = itertools.count(1)


def busy_label(reason: str) -> str:
    """A metrics label for a busy reason: its words before any detail ("at capacity: 3 of ...")."""
    return reason.split(":")[0].strip().replace(" ", "_")
# A line said with `say` ends when its text does; this caps its rendering for a model that runs on (the
# tiny stand-in never stops by itself): about 11 characters a second, slower than anyone speaks.
LINE_SECS_PER_CHAR = 0.09
LINE_LEAD_SECS = 1.0
# How often the page hears how a reply is going (its text and length so far), at most.
PROGRESS_EVERY_SECS = 0.5
# A call whose engine connection was lost has this long to say its goodbye before it is ended anyway.
LOST_ENGINE_END_SECS = 20.0


def model_source(source: str) -> str:
    """The model to load: a Hugging Face id is used when there is a GPU or its weights are already
    downloaded; otherwise (a CPU-only machine that would fetch 4B weights it can barely run) the
    tiny stand-in, said plainly."""
    if source == "tiny" or Path(source).is_dir() or torch.cuda.is_available():
        return source
    if try_to_load_from_cache(source, "config.json") not in (None, _CACHED_NO_EXIST):
        return source
    logger.warning(
        f"no GPU here and {source} is not downloaded, so the tiny stand-in runs instead; to run {source} "
        f"on this machine anyway, download it first (huggingface-cli download {source})"
    )
    return "tiny"


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


class AgentRuntime:
    def __init__(
        self,
        spec: AgentSpec,
        *,
        model=None,
        metrics: ServerMetrics | None = None,
        reasoner: Callable[[], Callable[..., ThinkerStream]] | None = None,
        engine_status: Callable[[], dict] | None = None,
    ):
        """`reasoner`: gives each new call the factory that picks its thinker's tokens, in place of the
        thinker's own choice (tests and scenario runs on the tiny model: a `ScriptedReasoner`).

        `engine_status`: how the engine that serves the calls is doing, as a dict such as
        {"behind_real_time": bool, "batch_size": int, "tick_seconds": float, "sessions": int}. While it
        says behind_real_time, new calls are refused as busy and /readyz says not ready. It is also the
        `engine_status` attribute, which may be set after construction (the one place it plugs in)."""
        self.spec = spec
        self.engine_status = engine_status
        self.max_sessions = spec.max_sessions
        # Calls promised a session whose pipeline does not exist yet (a SIP call answered, awaiting its
        # ACK): they count against max_sessions like running calls.
        self.reserved: set[str] = set()
        # Set once by a graceful drain (agent/drain.py): no new call is taken from then on.
        self.draining = False
        self._engine_failed = False
        self.reasoner = reasoner
        if model is None and spec.engine is not None:
            # The engine service's model serves the calls; this process runs only their pipelines.
            if reasoner is not None:
                raise ValueError("a reasoner picks the thinker's tokens inside the engine; give it to the engine's "
                                 "EngineServer, not to a runtime whose agent file names an engine")
            logger.info(f"agent {spec.name!r}: using the engine at {spec.engine}")
            model = RemoteEngine(spec.engine)  # EngineUnreachable names the URL when nothing answers
        if model is None:
            device = None if spec.device == "auto" else spec.device
            source = model_source(spec.model_source)
            logger.info(f"loading model {source!r} for agent {spec.name!r}")
            model = load_model(source, device=device)
        self.model = model
        if self.engine_status is None and isinstance(model, ChromaModel):
            self.engine_status = FrameScheduler.for_model(model).status
        if self.engine_status is None and isinstance(model, RemoteEngine):
            self.engine_status = model.status
        self.model_name = Path(str(model.source)).name if Path(str(model.source)).is_dir() else str(model.source)
        self.stand_in = bool(model.config.is_tiny)
        if self.stand_in:
            logger.warning(STAND_IN_NOTICE)
        self.voice = spec.voice_profile
        # by folder: each voice is read and checked once per process
        self._voices = {spec.voice: self.voice, **spec.flow_voices}
        self.metrics = metrics or ServerMetrics()
        self.calls: dict[str, Call] = {}
        self.outbound = None  # agent.outbound.OutboundBook: the calls this agent placed, made on first use
        self.twilio_dial_out = None  # agent.twilio_outbound.TwilioDialOut, set by the Twilio routes
        self.metrics.set_gauges("runtime", self._gauges)
        if isinstance(model, RemoteEngine):
            self.metrics.set_gauges("engine", model.gauges)
        # Call records (records: in the agent file): one writer for every call; None when off.
        self.records = CallRecords.from_spec(spec)
        self.shutting_down = False  # set by the server as it stops: calls ended then end as "shutdown"
        if self.records is not None:
            self.metrics.set_gauges("records", self.records.gauges)
            self.metrics.set_counters("records_written", self.records.counters)
        # Filled in by prepare(); until then a failed reply is reported but nothing plays in its place.
        self.model_error_audio = ModelErrorAudio(hang_up_after=spec.response.on_model_error.hang_up_after)
        self._prepared = False

    async def prepare(self) -> None:
        """Render, once, what the agent says when its model fails (response.on_model_error), in its
        voice, through the engine: kept in memory, it plays even while the model is failing. The
        server does this as it starts, before it takes calls; later calls are no-ops."""
        if self._prepared:
            return
        self._prepared = True
        if self.records is not None:
            await self.records.start()
        lines = self.spec.response.on_model_error
        started = time.monotonic()
        apology, goodbye = await self._render(lines.say), await self._render(lines.goodbye)
        self.model_error_audio = ModelErrorAudio(apology, goodbye, lines.hang_up_after)
        if apology is not None and goodbye is not None:
            logger.info(f"model-error lines rendered in {time.monotonic() - started:.1f} s")

    async def render_line(self, text: str) -> bytes | None:
        """`text` in the agent's voice through the model, its length capped to the text's (the tiny
        stand-in never stops by itself): 16-bit PCM at 24 kHz, or None when it could not be rendered."""
        return await self._render(text)

    async def close(self) -> None:
        """After the last call: what records are queued are written (bounded), then the writer stops."""
        self.shutting_down = True
        if self.records is not None:
            await self.records.close()

    def record_refusal(self, transport: str, reason: str, **ids) -> None:
        """A call refused as busy, kept as a record ending `busy` (ids: transport_ids, caller, callee)."""
        if self.records is not None:
            self.records.refused(transport, reason, **ids)

    async def _render(self, text: str) -> bytes | None:
        r = self.spec.response
        frames = min(r.max_frames, math.ceil((LINE_LEAD_SECS + LINE_SECS_PER_CHAR * len(text)) / FRAME_SECONDS))
        try:
            session = self.model.new_session(self.voice, "", chunk_frames=r.chunk_frames, max_frames=frames)
            try:
                return await render_line(session, text)
            finally:
                if isinstance(session, RemoteSession):
                    session.close()
        except Exception:
            logger.exception(f"could not render {text!r} for when the model fails; such replies will be silent")
            return None

    def find_voice(self, ref: str):
        """A voice by library name or folder (relative to the agent file), loaded once per process.
        Raises voices.LibraryError or voices.VoiceError naming what is wrong."""
        folder = str(self.spec.voice_library.resolve(ref, self.spec.path.parent))
        if folder not in self._voices:
            self._voices[folder] = load_voice(folder)
        return self._voices[folder]

    def active_calls(self, kind: str) -> int:
        """Calls of this transport kind now running (for each transport's max_calls)."""
        return sum(1 for call in self.calls.values() if call.stats.kind == kind)

    # Capacity: max_sessions, all transports together ------------------------------------------

    @property
    def sessions(self) -> int:
        """Sessions the model serves or has promised: running calls plus reserved ones."""
        return len(self.calls) + len(self.reserved)

    def engine_state(self) -> dict | None:
        """engine_status() now, or None when there is none. A status that cannot be read counts as
        behind real time: a server that cannot tell whether it keeps up must not take more calls."""
        if self.engine_status is None:
            return None
        try:
            state = self.engine_status()
            if not isinstance(state, dict):
                raise TypeError(f"engine_status() returned {type(state).__name__}, expected a dict")
        except Exception as exc:
            if not self._engine_failed:
                self._engine_failed = True
                logger.opt(exception=exc).error("engine_status() failed; refusing new calls while it does")
            return {"behind_real_time": True, "error": f"{type(exc).__name__}: {exc}"}
        self._engine_failed = False
        return state

    def busy_reason(self, state: dict | None = None, *, promised: bool = False) -> str | None:
        """Why one more call cannot be taken now, or None when it can. `state`: engine_state(), if the
        caller has it already. `promised`: the call was accepted before a drain began (a Twilio stream
        its webhook answered), so a drain alone does not refuse it."""
        if self.draining and not promised:
            return "draining"
        state = self.engine_state() if state is None else state
        if state is not None and state.get("error"):
            return f"engine status unavailable: {state['error']}"
        if state is not None and state.get("full"):  # a shared engine's sessions, all call servers together
            return f"engine at capacity: {state.get('open_sessions')} of its max_sessions {state.get('max_sessions')}"
        if state is not None and state.get("behind_real_time"):
            return "engine behind real time"
        if self.sessions >= self.max_sessions:
            return f"at capacity: {self.sessions} of max_sessions {self.max_sessions}"
        return None

    def reserve(self, key: str) -> str | None:
        """Hold a session for a call whose pipeline comes later (release it then); the busy reason
        instead, holding nothing, when none can be had."""
        reason = self.busy_reason()
        if reason is None:
            self.reserved.add(key)
        return reason

    def release(self, key: str) -> None:
        self.reserved.discard(key)

    def _gauges(self):
        yield "chroma_agents_sessions", "Calls the model serves or has promised (running plus reserved).", self.sessions
        yield "chroma_agents_sessions_reserved", "Calls promised a session, pipeline not started yet.", len(self.reserved)
        yield "chroma_agents_max_sessions", "Calls the model serves at once, all transports together.", self.max_sessions
        state = self.engine_state()
        if state is None:
            return
        yield "chroma_engine_behind_real_time", "1 while the engine cannot keep its calls in real time.", float(
            bool(state.get("behind_real_time"))
        )
        for key, help_text in (
            ("batch_size", "Replies advanced together in the engine's last tick."),
            ("tick_seconds", "Seconds per engine tick (with the job between ticks), averaged over about 2 s."),
            ("sessions", "Replies in flight in the engine."),
            ("reply_rtf_max", "The slowest reply in flight: wall seconds per second of audio (above 1: gaps)."),
            ("reply_rtf_median", "The median reply in flight: wall seconds per second of audio."),
        ):
            value = state.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                yield f"chroma_engine_{key}", help_text, value

    def new_session(self):
        r = self.spec.response
        sampling = Sampling(do_sample=r.temperature > 0, temperature=r.temperature or 1.0, top_k=r.top_k)
        return self.model.new_session(
            self.voice,
            self.spec.system_prompt,
            chunk_frames=r.chunk_frames,
            lookahead=r.lookahead,
            max_frames=r.max_frames,
            sampling=sampling,
            **({"thinker_stream": self.reasoner()} if self.reasoner is not None else {}),
        )

    def new_call(
        self,
        transport: BaseTransport,
        *,
        kind: str,
        call_id: str | None = None,
        out_rate: int | None = None,
        in_rate: int | None = None,
        screen: FrameProcessor | None = None,
    ):
        """`in_rate`: the rate the pipeline listens at. Phone transports pass 8000: VAD and Smart Turn
        work at 8 kHz, and a streaming 8 -> 16 kHz resampler in front of the VAD would hold back
        64 ms on average (118 ms at worst) of every caller's speech, delaying barge-in and end of turn.
        The service resamples each finished turn to the engine's 16 kHz instead.

        `screen`: a processor right after the transport's input that decides what of the callee's
        audio the agent hears (an outbound call's answering-machine gate)."""
        if in_rate not in (None, 8000, LISTEN_RATE):
            raise ValueError(f"in_rate is {in_rate}, expected 8000 or {LISTEN_RATE} (the VAD's rates)")
        call_id = call_id or f"{kind}-{next(_call_ids)}"
        call = Call(self, transport, kind, call_id, out_rate or SAMPLE_RATE, in_rate or LISTEN_RATE, screen)
        self.calls[call_id] = call
        return call


class Call:
    def __init__(
        self,
        runtime: AgentRuntime,
        transport: BaseTransport,
        kind: str,
        call_id: str,
        out_rate: int,
        in_rate: int,
        screen: FrameProcessor | None = None,
    ):
        spec = runtime.spec
        self.runtime = runtime
        self.transport = transport
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
                sensitive=lambda node: bool(getattr(dtmf.get(node), "sensitive", False)),
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
        output, tracker = with_playout(transport)
        pipeline = Pipeline(
            [
                transport.input(),
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
            transport=self.transport,
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
