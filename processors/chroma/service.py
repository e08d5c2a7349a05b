"""Chroma as a pipecat speech-to-speech service: one per call, on the process's one model.

Caller audio (16 kHz) is kept while the user speaks; when the user's turn ends the turn's audio
goes to the call's engine session, and its chunks come back as TTS audio and text frames. A
barge-in cancels the session, and the call's account of what was played (processors.playout's
AudioPlayedFrame, from its `CallPlayout`) tells the session what the caller heard.

Tool calls go through pipecat's function-call machinery, so `FlowManager` transitions work unchanged:
the session reports a parsed call, `run_function_calls` runs the registered handler, and its result
(seen here as it is broadcast) goes back into the thinker. The `LLMContextFrame` that pipecat sends
next (a result with run_llm, or a new node's LLMRunFrame) starts the reply that continues the turn.
Telephony actions arrive in order with the other frames as `CallActionFrame`s.

A reply that fails (the engine raised) is replaced by an apology rendered ahead in the agent's voice
(`ModelErrorAudio`), so the caller is not left in silence; after several failures in a row the
service says goodbye and ends the call.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
from loguru import logger
from pipecat.frames.frames import (
    CancelFrame,
    ControlFrame,
    EndFrame,
    EndWorkerFrame,
    Frame,
    FunctionCallFromLLM,
    FunctionCallResultFrame,
    InputAudioRawFrame,
    InterruptionFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMMessagesAppendFrame,
    LLMServiceMetadataFrame,
    LLMSetToolsFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.llm_service import LLMService
from pipecat.services.settings import LLMSettings
from pipecat.utils.text.base_text_aggregator import TextType

from ..audio import StreamResampler
from ..audio_io import to_float, to_pcm16
from ..playout import AudioPlayedFrame, CallPlayout, PlayedOutFrame, PlayoutFrame
from .config import FRAME_SECONDS, LISTEN_RATE, SAMPLE_RATE
from .session_protocol import SpeechSession
from .settings import ChromaSettings, open_session

# Without a VAD upstream no turn ever starts; this much loud caller audio with no turn says so.
NO_TURN_WARN_SECS = 3.0
SPEECH_RMS = 500.0  # -36 dBFS: well above line noise, well below speech
# How long a call action waits to hear the agent's audio was played out while no more of it is written to
# the line (a transport's lead and a far end's jitter buffer fit well inside it).
PLAYED_OUT_GRACE_SECS = 3.0


def pcm16(audio: np.ndarray) -> bytes:
    """Float samples in [-1, 1] as 16-bit PCM, the way every reply's audio leaves the service."""
    return to_pcm16(audio).tobytes()


async def render_line(session, text: str) -> bytes:
    """`text` said in `session`'s voice, whole, as 16-bit mono PCM at the engine's 24 kHz."""
    return b"".join([pcm16(chunk.audio) async for chunk in session.respond(None, say=text)])


@dataclass(frozen=True)
class ModelErrorAudio:
    """What replaces a reply the model failed on: lines rendered ahead (`render_line`), because the
    model may be failing when they are needed. `None`: that line could not be rendered; nothing plays.

    `hang_up_after`: failed replies in a row that end the call, the last one with `goodbye`."""

    apology: bytes | None = None
    goodbye: bytes | None = None
    hang_up_after: int = 3


@dataclass
class CallActionFrame(ControlFrame):
    """A flow's telephony action, queued at the top of the call's pipeline so that it takes its turn
    after the replies asked for before it (a node's post_actions run before its reply has started).

    `say`: speak this text in the agent's voice, after the replies before it. `audio`: play this 16-bit
    mono PCM at `rate`, likewise. `when_quiet`: run this once nothing is being said or waits to be,
    and what was said has been played out (hang up, transfer, send DTMF); a barge-in does not cancel it."""

    say: str | None = None
    audio: bytes | None = None
    rate: int = 0
    when_quiet: Callable[[], Awaitable[None]] | None = None
    interruptible: bool = field(default=True, init=False)

    def __post_init__(self):
        super().__post_init__()
        self.interruptible = self.when_quiet is None


class ChromaS2SService(LLMService):
    """Speech in, speech out, on one `ChromaSession` (see processors/chroma/session.py).

    Events: on_turn_started(service, turn), on_first_audio(service, ttfa_seconds),
    on_turn_finished(service, text, interrupted), on_barge_in(service, heard_frames, sent_frames),
    on_input_dropped(service, reason), on_tool_call(service, call), on_tool_result(service, call_id, result),
    on_user_speaking(service, speaking): the caller's turn opened (True) or closed (False),
    on_reply_progress(service, text, seconds): the reply so far, at each chunk,
    on_turn_failed(service, error, failed_in_row, hanging_up): a reply failed and was replaced by the
    apology (or, the last allowed, by the goodbye before the call ends).
    `sent_text` is the text of the current (or last) reply generated so far.
    """

    def __init__(
        self,
        session: SpeechSession | None = None,
        *,
        model=None,
        voice=None,
        settings: ChromaSettings | None = None,
        context=None,
        out_rate: int = SAMPLE_RATE,
        preroll_secs: float = 0.5,
        max_turn_secs: float = 60.0,
        model_error: ModelErrorAudio | None = None,
        **kwargs,
    ):
        """`out_rate`: the rate the call's output transport plays (8000 on the phone). Each reply is
        resampled here and its filter flushed when the reply ends, so no reply's last ~0.1 s waits in
        a streaming resampler for the next reply. `model_error`: what a failed reply is replaced by;
        without it a failed reply is only reported, and the call goes on.

        Built either on a `session` (the agent runtime makes one per call) or, as pipecat services are,
        from `model` (a preset such as "tiny", a checkpoint folder or a Hugging Face id, loaded once per
        process), `voice` (a voice folder or a voice library name) and `settings` (`ChromaSettings`)."""
        if session is None:
            if model is None or voice is None:
                raise ValueError(
                    "ChromaS2SService needs model= (e.g. 'FlashLabs/Chroma-4B', or 'tiny' for a stand-in) "
                    "and voice= (a voice folder or a library name), or a session"
                )
            session = open_session(model, voice, settings)
        elif model is not None or voice is not None or settings is not None:
            raise ValueError("ChromaS2SService takes a session or model=/voice=/settings=, not both")
        # Sampling lives in the session; pipecat's text-LLM knobs do not apply to a speech model.
        settings = LLMSettings(
            model=str(getattr(session.model, "source", "chroma")),
            system_instruction=session.system_prompt or None,
            temperature=None,
            max_tokens=None,
            top_p=None,
            top_k=None,
            frequency_penalty=None,
            presence_penalty=None,
            seed=None,
            filter_incomplete_user_turns=False,
            user_turn_completion_config=None,
            use_provider_thinking_default=False,
        )
        super().__init__(settings=settings, **kwargs)
        self.session = session
        self._preroll = deque()  # recent 16 kHz audio before the user's turn was detected
        self._preroll_bytes = 0
        self._preroll_max = int(preroll_secs * LISTEN_RATE) * 2
        self._turn_max = int(max_turn_secs * LISTEN_RATE) * 2
        self._turn: bytearray | None = None
        self._turn_overflow = False
        self._resampler: tuple[int, StreamResampler] | None = None
        self.out_rate = out_rate
        self._reply_task: asyncio.Task | None = None
        self._frames_pushed = 0
        self._turn_count = 0
        self.model_error = model_error
        self._failed_in_row = 0
        self._seen_messages = 0
        # The call's LLMContext (shared with its aggregators): flows append a node's task messages there,
        # and the thinker reads the new system ones before each reply. Function calls carry it too.
        self._context = context
        self._calls: dict[str, object] = {}  # tool calls made and not yet answered, by id
        self._pending_actions: set[asyncio.Task] = set()
        self._playout: CallPlayout | None = None  # the call's account of what was heard (PlayoutFrame)
        self._played_out_markers: list[PlayedOutFrame] = []
        session.on_tool_call = self._tool_call
        self.sent_text = ""
        # Caller speech heard before any turn started: with no VAD upstream no turn ever starts and the
        # agent stays silent, so past NO_TURN_WARN_SECS of it the service says so, once.
        self._speech_without_turn = 0.0
        self._turn_seen = False
        for name in ("on_turn_started", "on_first_audio", "on_turn_finished", "on_barge_in", "on_input_dropped",
                     "on_tool_call", "on_tool_result", "on_user_speaking", "on_reply_progress", "on_turn_failed"):
            self._register_event_handler(name)

    def can_generate_metrics(self) -> bool:
        return True

    def service_metadata_frame(self) -> LLMServiceMetadataFrame:
        # Local VAD and turn detection drive our turns, so no external strategies are suggested.
        return LLMServiceMetadataFrame(service_name=self.name, is_realtime_service=True)

    @property
    def speaking(self) -> bool:
        """A reply is being generated (its audio may play on for a while after)."""
        return self._reply_task is not None and not self._reply_task.done()

    async def set_voice(self, voice) -> None:
        """Speak from the next reply on in `voice` (a `voices.Voice`, as a flow node's hand-off asks);
        a reply under way finishes in its voice, and the conversation's memory carries over. The new
        voice's prefix is built now (once per process), so the next reply does not wait for it."""
        self.session.set_voice(voice)
        await self.session.prepare_voice()

    @property
    def hearing(self) -> bool:
        """The caller's turn is open: audio is being kept for the next reply."""
        return self._turn is not None

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            self._hear(frame)  # consumed here: nothing downstream needs caller audio
            return
        if isinstance(frame, AudioPlayedFrame):
            self._played(frame.seconds)
            return
        if isinstance(frame, PlayoutFrame):
            self._playout = frame.playout
            return
        if isinstance(frame, UserStartedSpeakingFrame):
            self._turn_seen = True
            self._turn = bytearray(b"".join(self._preroll))
            self._turn_overflow = False
            await self._call_event_handler("on_user_speaking", True)
        elif isinstance(frame, UserStoppedSpeakingFrame):
            await self._end_of_user_turn()
            await self._call_event_handler("on_user_speaking", False)
        elif isinstance(frame, InterruptionFrame):
            await self.push_frame(frame, direction)
            await self._barge_in()
            return
        elif isinstance(frame, LLMContextFrame):
            # pipecat's "run the model now": a tool's result, or a flow node that speaks first
            self._context = frame.context
            self._take_instructions(frame.context.get_messages())
            self._queue_reply(None)
            return
        elif isinstance(frame, LLMMessagesAppendFrame):
            self._take_instructions(frame.messages, appended=True)
        elif isinstance(frame, LLMSetToolsFrame):
            self._sync_registered_tool_handlers(frame.tools)
            self.session.set_tools(frame.tools)
        elif isinstance(frame, CallActionFrame):
            self._call_action(frame)
            return
        elif isinstance(frame, (EndFrame, CancelFrame)):
            await self._stop_reply()
            for task in list(self._pending_actions):
                await self.cancel_task(task)
        await self.push_frame(frame, direction)

    # -- caller audio -------------------------------------------------------------

    def _watch_for_turns(self, frame: InputAudioRawFrame) -> None:
        samples = np.frombuffer(frame.audio, np.int16)
        if not samples.size:
            return
        if np.sqrt(np.mean(samples.astype(np.float32) ** 2)) >= SPEECH_RMS:
            self._speech_without_turn += samples.size / (frame.num_channels * frame.sample_rate)
        if self._speech_without_turn >= NO_TURN_WARN_SECS:
            self._turn_seen = True  # warn once
            logger.warning(
                f"{self}: {self._speech_without_turn:.0f} s of caller speech reached the service and no "
                "user turn started, so it will never reply. Nothing upstream detects turns: give the user "
                "aggregator a VAD, e.g. LLMContextAggregatorPair(context, user_params="
                "LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer()))"
            )

    def _hear(self, frame: InputAudioRawFrame) -> None:
        if not self._turn_seen and not self.speaking:
            self._watch_for_turns(frame)
        audio = frame.audio
        if frame.num_channels != 1:
            audio = np.frombuffer(audio, np.int16).reshape(-1, frame.num_channels).mean(1).astype(np.int16).tobytes()
        if frame.sample_rate != LISTEN_RATE:
            if self._resampler is None or self._resampler[0] != frame.sample_rate:
                self._resampler = (frame.sample_rate, StreamResampler(frame.sample_rate, LISTEN_RATE))
            audio = self._resampler[1].process(audio)
        if self._turn is not None:
            if len(self._turn) < self._turn_max:
                self._turn += audio
            elif not self._turn_overflow:
                self._turn_overflow = True
                logger.warning(f"{self}: the caller's turn passed {self._turn_max // 2 / LISTEN_RATE:.0f} s; the rest is not heard")
                self.create_task(self._call_event_handler("on_input_dropped", "turn_too_long"), "chroma-dropped")
            return
        self._preroll.append(audio)
        self._preroll_bytes += len(audio)
        while self._preroll_bytes - len(self._preroll[0]) >= self._preroll_max:
            self._preroll_bytes -= len(self._preroll.popleft())

    async def _update_settings(self, delta: LLMSettings):
        changed = await super()._update_settings(delta)
        # The role itself, not pipecat's composition (which adds guidance for text LLMs' async tools).
        role = self._base_system_instruction
        if "system_instruction" in changed and isinstance(role, str) and role.strip():
            # a flow node's role message: the thinker reads it before the next reply
            if role.strip() != self.session.system_prompt.strip():
                self.session.instruct(role)
        return changed

    def _take_instructions(self, messages: list, appended: bool = False) -> None:
        """System and developer messages become instructions the thinker reads before the next
        turn; the agent's own system prompt is already in the session."""
        if not appended and len(messages) < self._seen_messages:
            self._seen_messages = 0  # the context was replaced (a flow node's reset strategy)
        start = 0 if appended else self._seen_messages
        new = messages[start:]
        if not appended:
            self._seen_messages = len(messages)
        for message in new:
            if not isinstance(message, dict) or message.get("role") not in ("system", "developer"):
                continue
            text = message.get("content")
            if isinstance(text, list):
                text = " ".join(p.get("text", "") for p in text if isinstance(p, dict))
            if text and text.strip() != self.session.system_prompt.strip():
                self.session.instruct(text)

    # -- turns ----------------------------------------------------------------------

    async def _end_of_user_turn(self) -> None:
        if self._turn is None:
            return
        if self._resampler is not None:
            self._turn += self._resampler[1].flush()  # the turn's last ~0.1 s, held in the filter
        audio = to_float(bytes(self._turn))
        self._turn = None
        self._preroll.clear()
        self._preroll_bytes = 0
        self._queue_reply(audio)

    def _queue_reply(self, user_audio: np.ndarray | None, say: str | None = None) -> None:
        """A reply after the ones already queued: to the caller's audio, or on the agent's own turn."""
        previous = self._reply_task
        self._reply_task = self.create_task(self._reply(user_audio, previous, time.time(), say), "chroma-reply")

    async def _reply(
        self, user_audio: np.ndarray | None, previous: asyncio.Task | None, turn_end: float, say: str | None = None
    ) -> None:
        # turn_end is wall-clock time, the base pipecat's metrics use
        if previous is not None and not previous.done():
            await asyncio.wait({previous})  # replies take turns (interruptions off, or queued by a flow)
        if user_audio is None:
            # The agent's own turn (a tool's answer, a node's line, a filler) does not talk over the
            # caller: it waits until the caller's turn is over, and goes before the answer to it.
            while self._turn is not None:
                await asyncio.sleep(0.02)
        if self._context is not None:
            self._take_instructions(self._context.get_messages())
        self._turn_count += 1
        self._frames_pushed = 0
        await self._call_event_handler("on_turn_started", self._turn_count)
        await self.start_ttfb_metrics(start_time=turn_end)
        await self.start_processing_metrics(start_time=turn_end)
        await self.push_frame(LLMFullResponseStartFrame())
        said = self.sent_text = ""
        started = False
        failure: Exception | None = None
        out = StreamResampler(SAMPLE_RATE, self.out_rate) if self.out_rate != SAMPLE_RATE else None
        try:
            async for chunk in self.session.respond(user_audio, say=say):
                if not started:
                    started = True
                    await self.stop_ttfb_metrics()
                    await self._call_event_handler("on_first_audio", time.time() - turn_end)
                    await self.push_frame(TTSStartedFrame())
                pcm = pcm16(chunk.audio)
                if out is not None:
                    pcm = out.process(pcm)
                audio = TTSAudioRawFrame(audio=pcm, sample_rate=self.out_rate, num_channels=1)
                await self.process_ttfa_metrics(audio)  # pipecat's TTFA: first byte plus leading silence
                await self.push_frame(audio)
                self._frames_pushed = chunk.frames[1]
                if len(chunk.text) > len(said) and chunk.text.startswith(said):
                    await self._push_text(chunk.text[len(said) :])
                    said = self.sent_text = chunk.text
                await self._call_event_handler("on_reply_progress", said, chunk.frames[1] * FRAME_SECONDS)
        except Exception as exc:  # a failed reply ends that reply (replaced by the apology), never the call
            failure = exc
        finally:
            await self.stop_processing_metrics()
        hanging_up = False
        if failure is None:
            self._failed_in_row = 0
        else:
            hanging_up, line = self._failed(failure)
            if line:  # where the failed reply stopped, in the same span of agent audio
                if not started:
                    started = True
                    await self.push_frame(TTSStartedFrame())
                await self._push_line(line, out)
            await self._call_event_handler("on_turn_failed", failure, self._failed_in_row, hanging_up)
        if started:
            tail = out.flush() if out is not None else b""
            if tail:
                await self.push_frame(TTSAudioRawFrame(audio=tail, sample_rate=self.out_rate, num_channels=1))
            await self.push_frame(TTSStoppedFrame())
        await self.push_frame(LLMFullResponseEndFrame())
        await self._call_event_handler("on_turn_finished", said, False)
        if hanging_up:
            await self.end_call()

    def _failed(self, error: Exception) -> tuple[bool, bytes | None]:
        """A reply failed: whether the call is to end (`hang_up_after` failures in a row), and the line
        to play in its place. Logged here, once, under the service's name (which carries the call's id)."""
        self._failed_in_row += 1
        policy = self.model_error
        hanging_up = policy is not None and self._failed_in_row >= policy.hang_up_after
        line = None if policy is None else policy.goodbye if hanging_up else policy.apology
        then = "saying goodbye and hanging up" if hanging_up else "playing the apology" if line else "nothing to play"
        logger.opt(exception=error).error(
            f"{self}: reply {self._turn_count} failed ({self._failed_in_row} in a row): {error!r}; {then}"
        )
        return hanging_up, line

    async def _push_line(self, pcm: bytes, out: StreamResampler | None) -> None:
        """Pre-rendered 24 kHz speech, pushed as a reply's audio is: in two-frame pieces, at out_rate."""
        step = 2 * round(SAMPLE_RATE * FRAME_SECONDS) * 2  # bytes of two frames of 16-bit samples
        for start in range(0, len(pcm), step):
            piece = pcm[start : start + step]
            if out is not None:
                piece = out.process(piece)
            if piece:
                await self.push_frame(TTSAudioRawFrame(audio=piece, sample_rate=self.out_rate, num_channels=1))

    # -- tools and telephony actions -----------------------------------------------------

    def _tool_call(self, call) -> None:
        """The session parsed a call (the reply speaks what came before it and stops there)."""
        self._calls[call.call_id] = call
        logger.info(f"{self}: tool call {call.name}({call.arguments})")
        function_call = FunctionCallFromLLM(
            function_name=call.name, tool_call_id=call.call_id, arguments=call.arguments, context=self._context
        )
        self.create_task(self._run_call(call, function_call), f"chroma-tool-{call.name}")

    async def _run_call(self, call, function_call: FunctionCallFromLLM) -> None:
        await self._call_event_handler("on_tool_call", call)
        await self.run_function_calls([function_call])

    async def broadcast_frame(self, frame_cls: type[Frame], **kwargs):
        # A function call's result is broadcast from here; the thinker reads it before the next reply.
        if frame_cls is FunctionCallResultFrame and kwargs.get("tool_call_id") in self._calls:
            call_id = kwargs["tool_call_id"]
            self._calls.pop(call_id)
            self.session.tool_result(kwargs.get("result"))
            await self._call_event_handler("on_tool_result", call_id, kwargs.get("result"))
        await super().broadcast_frame(frame_cls, **kwargs)

    def _call_action(self, frame: CallActionFrame) -> None:
        if frame.say is not None:
            self._queue_reply(None, say=frame.say)
        elif frame.audio is not None:
            previous = self._reply_task
            self._reply_task = self.create_task(self._play(frame.audio, frame.rate, previous), "chroma-play")
        elif frame.when_quiet is not None:
            task = self.create_task(self._when_quiet(frame.when_quiet), "chroma-call-action")
            self._pending_actions.add(task)
            task.add_done_callback(self._pending_actions.discard)

    async def _play(self, pcm: bytes, rate: int, previous: asyncio.Task | None) -> None:
        if previous is not None and not previous.done():
            await asyncio.wait({previous})
        if rate != self.out_rate:
            resampler = StreamResampler(rate, self.out_rate)
            pcm = resampler.process(pcm) + resampler.flush()
        await self.push_frame(TTSStartedFrame())
        step = self.out_rate // 50 * 2  # 20 ms pieces, as speech goes out
        for start in range(0, len(pcm), step):
            await self.push_frame(TTSAudioRawFrame(audio=pcm[start : start + step], sample_rate=self.out_rate, num_channels=1))
        await self.push_frame(TTSStoppedFrame())

    async def _when_quiet(self, action: Callable[[], Awaitable[None]]) -> None:
        """Run `action` once no reply is being generated or queued (replies queued later do not count)
        and what was said has been played out: a transfer must not cut its own "please hold"."""
        while (task := self._reply_task) is not None and not task.done():
            await asyncio.wait({task})
        await self._played_out()
        try:
            await action()
        except Exception:
            logger.exception(f"{self}: call action failed")

    async def _played_out(self) -> None:
        """Return once the audio pushed so far has been played out, a barge-in dropped it, or nothing
        more was written to the line for a while (an output that lost the marker must not hold the call)."""
        marker = PlayedOutFrame()
        self._played_out_markers.append(marker)
        try:
            await self.push_frame(marker)
            while True:
                written = self._playout.written_seconds if self._playout is not None else None
                try:
                    await asyncio.wait_for(marker.reached.wait(), timeout=PLAYED_OUT_GRACE_SECS)
                    return
                except TimeoutError:
                    # Audio still being written: the marker is queued behind it and on its way.
                    if written is None or self._playout.written_seconds == written:
                        logger.warning(f"{self}: no word that the audio was played out; going on")
                        return
        finally:
            self._played_out_markers.remove(marker)

    async def end_call(self) -> None:
        """Hang up once what has been said is played out: pushed downstream, behind the reply's audio,
        the request reaches the worker after that audio has gone out; the worker then ends the call."""
        await self.push_frame(EndWorkerFrame(reason="the agent ended the call"))

    async def _push_text(self, text: str) -> None:
        # LLMTextFrame for transcripts/observers (kept out of the context); TTSTextFrame travels in
        # step with the audio, so the assistant aggregator records the text as it is played.
        llm_text = LLMTextFrame(text)
        llm_text.append_to_context = False
        await self.push_frame(llm_text)
        spoken = TTSTextFrame(text, text_type=TextType.WORD)
        spoken.includes_inter_frame_spaces = True
        await self.push_frame(spoken)

    async def _barge_in(self) -> None:
        for marker in self._played_out_markers:  # dropped with the audio: nothing more will play
            marker.reached.set()
        if self._reply_task is None:
            return
        generating = not self._reply_task.done()
        await self._stop_reply()
        await self.stop_all_metrics()
        if generating:
            await self.push_frame(TTSStoppedFrame())
            await self.push_frame(LLMFullResponseEndFrame())
            await self._call_event_handler("on_turn_finished", self.session.kept_text, True)

    def _played(self, seconds: float) -> None:
        """The output side's count of the cut reply's audio; frames not fully played are dropped."""
        frames = min(int(seconds / FRAME_SECONDS + 1e-6), self._frames_pushed)
        self.session.heard(frames)
        logger.debug(f"{self}: barge-in after {seconds:.2f} s played; keeping {frames} frames")
        self.create_task(self._call_event_handler("on_barge_in", frames, self._frames_pushed), "chroma-barge-in")

    async def _stop_reply(self) -> None:
        task, self._reply_task = self._reply_task, None
        if task is not None and not task.done():
            self.session.cancel()
            await self.cancel_task(task)
