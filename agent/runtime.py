"""The agent at run time: one model per process, one pipeline and one engine session per call.

    runtime = AgentRuntime(load_agent("agent.yaml"))      # loads the model once
    call = runtime.new_call(line)                         # any transports.line.Line (agent/call.py)
    stats = await call.run()                              # returns when the call ends; frees the session

Each line's glue (admitting a call, building its line, running it) is in agent/lines/. With a flow file
(`flow:` in the agent file) each call runs its own pipecat `FlowManager` from the moment its pipeline
starts, with the flow's tools and telephony actions bound to that call.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.file_download import _CACHED_NO_EXIST
from loguru import logger
from pipecat.processors.frame_processor import FrameProcessor

from processors.chroma.checkpoint import load_model
from processors.chroma.config import LISTEN_RATE
from processors.chroma.generation import Sampling, ThinkerStream
from processors.chroma.modeling import ChromaModel
from processors.chroma.remote import RemoteEngine, RemoteSession
from processors.chroma.scheduler import FrameScheduler
from processors.chroma.service import FRAME_SECONDS, ModelErrorAudio, render_line
from records.recorder import CallRecords
from transports.line import Line
from voices.profile import load_voice

from .call import Call
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

    def new_call(self, line: Line, *, call_id: str | None = None, screen: FrameProcessor | None = None) -> Call:
        """A call on `line` (transports.line.Line), which gives its kind and audio rates; `call.run()` runs it.

        The line's `in_rate` is the rate the pipeline listens at. Phone lines listen at 8000: VAD and Smart Turn
        work at 8 kHz, and a streaming 8 -> 16 kHz resampler in front of the VAD would hold back
        64 ms on average (118 ms at worst) of every caller's speech, delaying barge-in and end of turn.
        The service resamples each finished turn to the engine's 16 kHz instead.

        `screen`: a processor right after the line's input that decides what of the callee's
        audio the agent hears (an outbound call's answering-machine gate)."""
        if line.in_rate not in (8000, LISTEN_RATE):
            raise ValueError(
                f"{line.kind} line's in_rate is {line.in_rate}, expected 8000 or {LISTEN_RATE} (the VAD's rates)"
            )
        call_id = call_id or f"{line.kind}-{next(_call_ids)}"
        call = Call(self, line, call_id, screen)
        self.calls[call_id] = call
        return call
