"""One call's conversation with the engine: streaming replies, barge-in, memory across turns.

    session = model.new_session(voice=(audio_24k, transcript), system_prompt="...")  # or a voices.Voice
    async for chunk in session.respond(user_audio_16k):
        play(chunk.audio)            # 24 kHz float32, frames chunk.frames
    session.cancel()                 # barge-in: no chunk after this returns
    session.heard(frames)            # what the caller actually heard of the cut reply
    session.set_voice(other_voice)   # the next reply speaks in it; the conversation carries over

Tool calls: after `set_tools(tools)` the thinker is told the functions it may call. A call it writes is
held back from the backbone (never spoken) and handed to `on_tool_call` as soon as it is parsed; the
reply speaks what came before the call and ends there. `tool_result(result)` gives the result back, and
`respond()` with no audio continues the turn from it. `respond(say="...")` speaks fixed text in the
agent's voice through the same model (its tokens are forced as the thinker's output).

Model work runs on the model's scheduler thread (`scheduler.py`), which advances every session's reply
in one batched step per frame; chunks come back through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from .codec_stream import StreamingCodecDecoder
from .generation import (
    ResponseSteps,
    Sampling,
    StepTrace,
    ThinkerStream,
    TokenFilter,
    VoicePrompt,
    build_voice_prompt,
    prefill_thinker,
    truncate_cache,
)
from .modeling import ChromaModel
from .scheduler import FrameScheduler, ReplyStream
from .scripted import forced_text_stream
from .text import ChatLayout, Listener
from .tools import ToolCall, ToolCallFilter, tool_descriptions, tool_response_text, tools_system_text


@dataclass
class AudioChunk:
    audio: np.ndarray  # float32, 24 kHz mono
    frames: tuple[int, int]  # [start, end) frame indices within the reply
    text_tokens: list[int]  # text tokens consumed by frames < end
    text: str  # those tokens as text
    codes: torch.Tensor  # [end - start, num_codebooks]


@dataclass(frozen=True)
class SpeakingVoice:
    """What a session needs of a voice: its reference, transcript, a content key, and (for a library
    voice) a way to get its stored codec codes instead of encoding the reference again."""

    audio: np.ndarray  # 24 kHz mono float32
    transcript: str
    key: str
    name: str = ""
    stored_codes: Callable[[ChromaModel], torch.Tensor] | None = None

    @classmethod
    def of(cls, voice) -> SpeakingVoice:
        """From an (audio_24k, transcript) pair or a `voices.Voice`."""
        if isinstance(voice, SpeakingVoice):
            return voice
        if isinstance(voice, tuple):
            audio, transcript = voice
            audio = np.ascontiguousarray(np.asarray(audio, dtype=np.float32).reshape(-1))
            return cls(audio, transcript, VoiceLibraryCache.key(audio, transcript))
        return cls(voice.audio, voice.transcript, voice.key, voice.name, voice.codes_for)


@dataclass
class _Reply:
    steps: ResponseSteps
    thinker_cache_length: int  # thinker cache length at the start of the reply's text
    thinker_next_position: int
    token_filter: TokenFilter
    stream: ReplyStream
    frames_emitted: int = 0


class VoiceLibraryCache:
    """Backbone prefixes per voice, computed once per process and shared by every call."""

    registry_lock = threading.Lock()

    def __init__(self):
        self._prompts: dict[str, VoicePrompt] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(audio_24k: np.ndarray, transcript: str) -> str:
        digest = hashlib.sha256(np.ascontiguousarray(audio_24k, dtype=np.float32).tobytes())
        digest.update(transcript.encode("utf-8"))
        return digest.hexdigest()

    def get(self, model: ChromaModel, tokenizer, voice: SpeakingVoice) -> VoicePrompt:
        with self._lock:
            if voice.key not in self._prompts:
                ids = torch.tensor(tokenizer.encode(voice.transcript), dtype=torch.long)
                codes = voice.stored_codes(model) if voice.stored_codes is not None else None
                audio = torch.from_numpy(voice.audio)
                self._prompts[voice.key] = build_voice_prompt(model, ids, audio, codes=codes)
            return self._prompts[voice.key]

    def has(self, voice: SpeakingVoice) -> bool:
        with self._lock:
            return voice.key in self._prompts

    def __len__(self) -> int:
        return len(self._prompts)


class ChromaSession:
    def __init__(
        self,
        model: ChromaModel,
        tokenizer,
        voice,
        system_prompt: str = "",
        chunk_frames: int = 2,
        lookahead: int = 3,
        max_frames: int = 750,
        sampling: Sampling | None = None,
        token_filter: Callable[[], TokenFilter] | None = None,
        thinker_stream: Callable[..., ThinkerStream] = ThinkerStream,
        reuse_voice_prompt: bool = True,
    ):
        if not 1 <= chunk_frames <= 4:
            raise ValueError(f"chunk_frames is {chunk_frames}, expected 1 to 4")
        self.voice = self._checked(voice)  # the voice of the current (or last) reply
        self._next_voice: SpeakingVoice | None = None
        self._voice_lock = threading.Lock()  # set_voice (event loop) vs the reply's start (scheduler thread)
        self.model = model
        self.tokenizer = tokenizer
        self.layout = ChatLayout(tokenizer)
        self.listener = Listener(model)
        self.system_prompt = system_prompt
        self.chunk_frames = chunk_frames
        self.lookahead = lookahead
        self.max_frames = max_frames
        self.sampling = sampling or Sampling()
        self.token_filter = token_filter  # None: the tool-call filter once tools are set, else speak all
        self.thinker_stream = thinker_stream  # how the thinker's tokens are chosen (a script, in tests)
        self.reuse_voice_prompt = reuse_voice_prompt
        self.scheduler = FrameScheduler.for_model(model)
        self.codec = StreamingCodecDecoder(model.codec_model)
        self.thinker_cache = DynamicCache()
        self.thinker_position = 0
        self.pending_ids = self.layout.system(system_prompt) if system_prompt else []
        self._pending_lock = threading.Lock()  # pending_ids: the event loop adds, the scheduler thread takes
        self.tools: list[dict] = []  # the functions the thinker has been told it may call
        self._tools_key = "[]"
        self.on_tool_call: Callable[[ToolCall], None] | None = None  # called on the event loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self.history_ids: list[int] = []  # every id the thinker has read, in order (for inspection)
        self.turns: list[str] = []  # the assistant text kept from each finished turn
        self._reply: _Reply | None = None
        self._heard_frames: int | None = None

    # -- public API ------------------------------------------------------------

    async def respond(self, user_audio_16k: np.ndarray | None = None, *, say: str | None = None) -> AsyncIterator[AudioChunk]:
        """Stream the reply to one user turn as 24 kHz chunks. With no audio the agent speaks on its own
        turn (after a tool's result, or when a flow node starts); `say` makes that turn exactly this text."""
        self._loop = asyncio.get_running_loop()
        audio = None if user_audio_16k is None else np.asarray(user_audio_16k, dtype=np.float32).reshape(-1)
        # The caller's audio becomes thinker features here, off the scheduler thread (numpy and
        # small tensors; no model state), so the model's own thread only prefills.
        heard = None if audio is None else await asyncio.to_thread(self.listener.hear, audio)
        stream: ReplyStream = await self.scheduler.run(self._start_reply, heard, say)
        ended = False
        try:
            while True:
                item = await stream.queue.get()
                stream.taken()
                if item is None or stream.cancelled.is_set():
                    ended = item is None
                    break
                if isinstance(item, BaseException):
                    ended = True
                    raise item
                yield item
        finally:
            if not ended:  # the consumer stopped reading: the reply leaves the batch at the next tick
                stream.cancel()

    def instruct(self, text: str) -> None:
        """A system instruction the thinker reads before the next user turn (a flow node's task)."""
        with self._pending_lock:
            self.pending_ids = self.pending_ids + self.layout.system(text)

    def set_tools(self, tools) -> None:
        """The functions the thinker may call from the next reply on (a pipecat `ToolsSchema`, its
        `FunctionSchema`s, or plain dicts), told to it as a system instruction when they change."""
        described = tool_descriptions(tools)
        key = json.dumps(described, sort_keys=True, default=str)
        if key == self._tools_key:
            return
        self._tools_key, self.tools = key, described
        self.instruct(tools_system_text(described) if described else "No tools are available now; write no tool calls.")

    def tool_result(self, result) -> None:
        """The result of the last reply's tool call; the thinker reads it before the next reply."""
        with self._pending_lock:
            self.pending_ids = self.pending_ids + self.layout.tool_response(tool_response_text(result))
        hook = getattr(self.thinker_stream, "tool_result", None)  # a scripted reasoner's answer may use it
        if hook is not None:
            hook(result)

    @property
    def paused_at_call(self) -> bool:
        """The last reply ended at a tool call and waits for its result."""
        return self._reply is not None and self._reply.steps.thinker.paused_at_call

    def set_voice(self, voice) -> None:
        """Speak the next reply, and those after it, in `voice` (an (audio_24k, transcript) pair or a
        `voices.Voice`). A reply already under way keeps its voice; the conversation carries over."""
        voice = self._checked(voice)
        with self._voice_lock:
            self._next_voice = voice

    async def prepare_voice(self) -> None:
        """Build the prefix of the voice set for the next reply now, so that reply does not wait for it."""
        voice = self._next_voice
        if voice is not None and self.reuse_voice_prompt:
            await self.scheduler.run(lambda: _voice_cache(self.model).get(self.model, self.tokenizer, voice))

    @property
    def voice_name(self) -> str:
        """The name of the voice the next reply speaks in ('' for an unnamed reference)."""
        return (self._next_voice or self.voice).name

    def cancel(self) -> None:
        """Barge-in: no further chunk is yielded, and generation stops within one step."""
        if self._reply is not None:
            self._reply.stream.cancel()

    def heard(self, frames: int) -> None:
        """The caller heard `frames` frames of the last reply; the rest is forgotten."""
        self._heard_frames = max(0, int(frames))

    @property
    def trace(self) -> list[StepTrace]:
        """What entered the backbone at each step of the current or last reply."""
        return list(self._reply.steps.trace) if self._reply else []

    @property
    def kept_text(self) -> str:
        """The assistant text the conversation currently keeps for the last reply."""
        if self._reply is None:
            return self.turns[-1] if self.turns else ""
        return self._text(self._kept_tokens())

    # -- worker-thread parts -------------------------------------------------------

    @staticmethod
    def _checked(voice) -> SpeakingVoice:
        voice = SpeakingVoice.of(voice)
        if not voice.transcript.strip():
            raise ValueError("voice transcript is empty; the reference audio's transcript is required")
        return voice

    def _voice_prompt_ready(self) -> bool:
        return self.reuse_voice_prompt and _voice_cache(self.model).has(self.voice)

    def _voice_prompt(self) -> VoicePrompt:
        if self.reuse_voice_prompt:
            return _voice_cache(self.model).get(self.model, self.tokenizer, self.voice)
        # The reference's way, kept for comparison: encode the reference and prefill it for every reply.
        ids = torch.tensor(self.tokenizer.encode(self.voice.transcript), dtype=torch.long)
        return build_voice_prompt(self.model, ids, torch.from_numpy(self.voice.audio))

    def _make_filter(self) -> TokenFilter:
        if self.token_filter is not None:
            return self.token_filter()
        if not self.tools:
            return TokenFilter()
        return ToolCallFilter(self._text, on_call=self._call_found, special_ids=[self.model.config.im_end_token_id])

    def _call_found(self, call: ToolCall) -> None:
        # On the scheduler thread, as soon as the call is parsed: the tool starts while the words before
        # the call are still being spoken.
        callback, loop = self.on_tool_call, self._loop
        if callback is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(callback, call)

    def _start_reply(self, heard: tuple[torch.Tensor, torch.Tensor, int] | None, say: str | None = None):
        """A job on the scheduler thread, in pieces (each `yield` lets one tick of the other calls run):
        the thinker's prefill of the turn (`heard`: the caller's audio as features, mask and audio
        token count, or None for the agent's own turn), then, for a voice not yet cached, its prefix.
        The previous reply's last step is over before the first piece runs."""
        self._close_previous_reply()
        with self._voice_lock:  # a switch asked for during the last reply starts here
            if self._next_voice is not None:
                self.voice, self._next_voice = self._next_voice, None
        with self._pending_lock:
            pending, self.pending_ids = self.pending_ids, []
        if heard is not None:
            features, feature_mask, audio_tokens = heard
            segment = pending + self.layout.user_audio_turn(audio_tokens)
        else:
            features = feature_mask = None
            segment = pending + self.layout.assistant_start()
        ids = torch.tensor([segment], dtype=torch.long)
        hidden, token, next_pos = prefill_thinker(
            self.model, ids, self.thinker_cache, self.thinker_position, features, feature_mask
        )
        self.history_ids += segment
        if say is not None:
            factory, token_filter = forced_text_stream(self.tokenizer, say), TokenFilter()
        else:
            factory, token_filter = self.thinker_stream, self._make_filter()
        stream = factory(self.model, self.thinker_cache, next_pos, hidden, token, self.lookahead, token_filter)
        if not self._voice_prompt_ready():
            yield  # building a voice's prefix is a backbone prefill of its own
        prompt = self._voice_prompt()
        steps = ResponseSteps(self.model, prompt, stream, self.max_frames, self.sampling)
        live = ReplyStream(steps, prompt, self.chunk_frames, self.codec, self._chunk, self._loop)
        self._reply = _Reply(steps, self.thinker_cache.get_seq_length(), next_pos, token_filter, live)
        self._heard_frames = None
        self.codec.reset()
        self.scheduler.admit(live)
        return live

    def _chunk(self, frames: list[torch.Tensor], audio: torch.Tensor) -> AudioChunk:
        """The next chunk of the reply from its new frames and their audio (on the scheduler thread)."""
        reply = self._reply
        codes = torch.stack(frames)
        audio = audio.float().cpu().numpy()
        start = reply.frames_emitted
        reply.frames_emitted += len(frames)
        tokens = reply.steps.text_before(reply.frames_emitted)
        return AudioChunk(audio, (start, reply.frames_emitted), tokens, self._text(tokens), codes.cpu())

    def _kept_tokens(self) -> list[int]:
        reply = self._reply
        frames = reply.frames_emitted if self._heard_frames is None else min(self._heard_frames, reply.frames_emitted)
        return [t for t in reply.steps.text_before(frames) if t != self.model.config.im_end_token_id]

    def _close_previous_reply(self) -> None:
        """Forget what the caller did not hear: cut the thinker back to the start of the reply
        and queue the kept text, closed, ahead of the next user turn."""
        if self._reply is None:
            return
        self.scheduler.retire(self._reply.stream)  # a reply cancelled since the last tick
        kept = self._kept_tokens()
        # A tool call the reply made stays in the thinker's memory (never in what was said), so the
        # result that follows it reads as the Qwen template has it.
        calls = [t for ids in getattr(self._reply.token_filter, "call_tokens", []) for t in ids]
        truncate_cache(self.thinker_cache, self._reply.thinker_cache_length)
        self.thinker_position = self._reply.thinker_next_position
        with self._pending_lock:  # then what came meanwhile: tool results, instructions
            self.pending_ids = self.layout.close_assistant(kept + calls) + self.pending_ids
        self.turns.append(self._text(kept))
        self._reply = None

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)  # both tokenizers skip special ids such as im_end


_VOICE_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _voice_cache(model: ChromaModel) -> VoiceLibraryCache:
    with VoiceLibraryCache.registry_lock:
        if model not in _VOICE_CACHES:
            _VOICE_CACHES[model] = VoiceLibraryCache()
        return _VOICE_CACHES[model]
