"""A Chroma engine in another process (`chroma-agent engine`), reached over gRPC.

    engine = RemoteEngine("grpc://127.0.0.1:7400")       # fails now, naming the URL, if nobody answers
    session = engine.new_session(voice, "You are ...")   # a SpeechSession, as model.new_session gives
    async for chunk in session.respond(user_audio_16k):  # the same chunks, codes and text
        ...
    session.close()                                      # the engine frees the call's session

Each session is one bidirectional stream (engine_wire.py has the messages): inputs go in the order the
pipeline makes them, so the engine applies them in that order, as an in-process session would.
`ChromaS2SService` drives a `RemoteSession` exactly as it drives a `ChromaSession`.

Nothing waits for ever on the engine: the channel pings it (a peer that vanished is found in seconds),
a reply with no word from the engine for `reply_timeout` fails, and a lost stream fails the reply
under way and every later one (the service then says its goodbye line and the call ends; the agent
runtime does that for a call that is not speaking, through `on_lost`). The engine's status is polled
on a thread, so /readyz and /metrics read it without a network call on the event loop.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import itertools
import re
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from loguru import logger

from .engine_wire import (
    MAX_MESSAGE_BYTES,
    SESSION_METHOD,
    STATUS_METHOD,
    WIRE_VERSION,
    Message,
    decode,
    encode,
)
from .generation import Sampling
from .session import ChromaSession
from .tools import ToolCall, tool_descriptions

URL = re.compile(r"^grpc://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")
CONNECT_TIMEOUT_SECS = 5.0
STATUS_EVERY_SECS = 0.5
STATUS_TIMEOUT_SECS = 2.0
# A status older than this (polls failing, or the poller stuck) is no status: the server takes no calls.
STATUS_STALE_SECS = 5.0
FIRST_CHUNK_TIMEOUT_SECS = 30.0  # a busy engine's queue of prefills, a long turn's features
NEXT_CHUNK_TIMEOUT_SECS = 10.0
VOICE_TIMEOUT_SECS = 30.0
CLOSE_GRACE_SECS = 5.0
CLIENT_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 3000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # reconnect soon after an engine restart rather than after grpc's default back-off of up to 2 min
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
_END = object()


class EngineUnavailable(RuntimeError):
    """The engine cannot serve this (a lost connection, a refused session, no word in time)."""


class EngineUnreachable(EngineUnavailable):
    """Nothing answers at the engine's URL."""


def engine_target(url: str) -> str:
    """'HOST:PORT' of a `grpc://HOST:PORT` URL; ValueError says what was expected."""
    match = URL.match(url.strip())
    if match is None or not 0 < int(match["port"]) < 65536:
        raise ValueError(
            f"{url!r} is not an engine URL; expected grpc://HOST:PORT with a port from 1 to 65535"
        )
    return f"{match['host']}:{int(match['port'])}"


@dataclass(frozen=True)
class RemoteModelConfig:
    """What the call server needs to know of the engine's model (as `model.config` answers it)."""

    is_tiny: bool


@dataclass
class RemoteChunk:
    audio: np.ndarray  # float32, 24 kHz mono
    frames: tuple[int, int]  # [start, end) frames within the reply
    text: str  # the reply's text up to `end`
    codes: np.ndarray | None  # [end - start, num_codebooks] int32, where the engine sends them
    made: float = 0.0  # when the engine had it: time.monotonic() on the engine's host


class RemoteEngine:
    """The engine at `url`, for one call-server process: its sessions, its status, its channel."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = CONNECT_TIMEOUT_SECS,
        status_every: float = STATUS_EVERY_SECS,
        reply_timeout: tuple[float, float] = (FIRST_CHUNK_TIMEOUT_SECS, NEXT_CHUNK_TIMEOUT_SECS),
    ):
        self.url = url
        self.target = engine_target(url)
        self.reply_timeout = reply_timeout
        self.sessions_opened = 0
        self.sessions_lost = 0  # sessions that ended without the call server closing them
        self._channels: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one per event loop
        self._sync_channel = grpc.insecure_channel(self.target, options=CLIENT_OPTIONS)
        self._status_rpc = self._sync_channel.unary_unary(STATUS_METHOD)
        try:
            first = self._poll(timeout=connect_timeout, wait_for_ready=True)
        except grpc.RpcError as exc:
            self._sync_channel.close()
            raise EngineUnreachable(
                f"engine {url}: no answer within {connect_timeout:.0f} s ({_rpc_reason(exc)}); expected "
                f"`chroma-agent engine` listening at {self.target} (start it first, or remove `engine:` from "
                "the agent file to run the model in this process)"
            ) from None
        if first.get("wire_version") != WIRE_VERSION:
            self._sync_channel.close()
            raise EngineUnreachable(
                f"engine {url} speaks wire version {first.get('wire_version')!r}; this call server speaks "
                f"{WIRE_VERSION} (run the same chroma-agents version on both)"
            )
        self._status, self._status_at, self._status_error = first, time.monotonic(), None
        self.source = first.get("model", "")
        self.device = f"{first.get('device', '?')} (engine {url})"
        self.config = RemoteModelConfig(is_tiny=bool(first.get("is_tiny")))
        self._closed = threading.Event()
        self._poller = threading.Thread(
            target=self._poll_loop, args=(status_every,), name="engine-status", daemon=True
        )
        self._poller.start()

    # -- status ---------------------------------------------------------------------------------

    def _poll(self, timeout: float, wait_for_ready: bool = False) -> dict:
        reply = decode(self._status_rpc(b"", timeout=timeout, wait_for_ready=wait_for_ready))
        return dict(reply.get("status") or {})

    def _poll_loop(self, every: float) -> None:
        while not self._closed.wait(every):
            try:
                status = self._poll(STATUS_TIMEOUT_SECS)
            except Exception as exc:  # grpc.RpcError, or a reply that is not a status
                reason = _rpc_reason(exc) if isinstance(exc, grpc.RpcError) else repr(exc)
                if self._status_error is None:
                    logger.error(f"engine {self.url}: status unavailable ({reason}); taking no new calls")
                self._status_error = reason
                continue
            if self._status_error is not None:
                logger.info(f"engine {self.url}: answering again")
            self._status, self._status_at, self._status_error = status, time.monotonic(), None

    @property
    def connected(self) -> bool:
        return self._status_error is None and time.monotonic() - self._status_at < STATUS_STALE_SECS

    def status(self) -> dict:
        """The engine's last status (its scheduler's, plus open_sessions and max_sessions), at most
        `status_every` old; EngineUnavailable when the engine has not answered lately. `full`: one more
        call would not get a session (the engine's max_sessions, all call servers together)."""
        if not self.connected:
            raise EngineUnavailable(f"engine {self.url}: {self._status_error or 'no status for a while'}")
        status = dict(self._status)
        status["full"] = status.get("open_sessions", 0) >= status.get("max_sessions", float("inf"))
        return status

    def gauges(self) -> Iterator[tuple[str, str, float]]:
        """For /metrics (ServerMetrics.set_gauges)."""
        yield "chroma_engine_connected", f"1 while the engine at {self.url} answers.", float(self.connected)
        yield (
            "chroma_engine_sessions_lost",
            "Calls whose engine session was lost or refused.",
            self.sessions_lost,
        )

    # -- sessions -------------------------------------------------------------------------------

    def new_session(
        self,
        voice,
        system_prompt: str = "",
        *,
        chunk_frames: int = 2,
        lookahead: int = 3,
        max_frames: int = 750,
        sampling: Sampling | None = None,
        **unsupported,
    ) -> RemoteSession:
        """A session on the engine, with the settings `ChromaModel.new_session` takes. Settings that are
        code (a scripted thinker) cannot cross: give those to the engine's own process."""
        if unsupported:
            raise TypeError(
                f"{', '.join(unsupported)} cannot be sent to a remote engine; set it where the engine runs"
            )
        if not 1 <= chunk_frames <= 4:
            raise ValueError(f"chunk_frames is {chunk_frames}, expected 1 to 4")
        settings = {
            "chunk_frames": chunk_frames,
            "lookahead": lookahead,
            "max_frames": max_frames,
            "sampling": dataclasses.asdict(sampling or Sampling()),
        }
        self.sessions_opened += 1
        return RemoteSession(self, voice, system_prompt, settings)

    def channel(self) -> grpc.aio.Channel:
        """The asyncio channel for the running event loop (a grpc.aio channel belongs to one loop)."""
        loop = asyncio.get_running_loop()
        channel = self._channels.get(loop)
        if channel is None:
            channel = self._channels[loop] = grpc.aio.insecure_channel(self.target, options=CLIENT_OPTIONS)
        return channel

    def close(self) -> None:
        self._closed.set()
        self._sync_channel.close()


def _rpc_reason(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code.name if code else 'error'}: {details}"


def _voice_message(kind: str, voice, **fields) -> bytes:
    voice = ChromaSession._checked(voice)
    spec = {"key": voice.key, "name": voice.name, "transcript": voice.transcript}
    return encode(kind, {"voice_audio": voice.audio}, voice=spec, **fields)


class RemoteSession:
    """One call's session on a remote engine; `processors.chroma.session_protocol.SpeechSession`.

    `on_lost(reason)`: called (on the event loop) once, when the session can no longer be served: the
    stream broke, the engine refused the session or closed it. Every reply from then on fails."""

    def __init__(self, engine: RemoteEngine, voice, system_prompt: str, settings: dict):
        self.engine = engine
        self.model = engine  # its `source` names the model in pipecat's settings
        self.system_prompt = system_prompt
        self.on_tool_call: Callable[[Any], None] | None = None
        self.on_lost: Callable[[str], None] | None = None
        self.lost: str | None = None
        self._open = _voice_message(
            "open", voice, wire_version=WIRE_VERSION, system_prompt=system_prompt, **settings
        )
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._call = None
        self._reader: asyncio.Task | None = None
        self._closed = False
        self._reply_ids = itertools.count(1)
        self._replies: dict[int, asyncio.Queue] = {}
        self._current: int | None = None
        self._cancelled: set[int] = set()
        self._voice_waiters: list[asyncio.Future] = []
        # The last reply's text at each chunk's end (what the caller may have heard of it), for kept_text.
        self._chunk_ends: list[int] = []
        self._chunk_texts: list[str] = []
        self._heard: int | None = None

    # -- the stream -------------------------------------------------------------------------------

    def _start(self) -> None:
        if self._call is not None or self._closed:
            return
        self._call = self.engine.channel().stream_stream(SESSION_METHOD)(self._requests())
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="engine-session")

    async def _requests(self) -> AsyncIterator[bytes]:
        yield self._open
        while (item := await self._outbox.get()) is not None:
            yield item

    def _send(self, message: bytes) -> None:
        if self._closed or self.lost is not None:
            return
        self._outbox.put_nowait(message)
        try:
            self._start()
        except RuntimeError:  # no running loop (set up before the call runs): sent when it starts
            pass

    async def _read(self) -> None:
        reason = "the engine ended the session"
        try:
            async for data in self._call:
                self._take(decode(data))
        except grpc.aio.AioRpcError as exc:
            reason = _rpc_reason(exc)
        except asyncio.CancelledError:  # this process is ending the call (or its event loop)
            raise
        except Exception as exc:  # an unreadable message: this engine does not speak our format
            reason = f"unreadable message from the engine: {exc!r}"
        if not self._closed:
            self._lose(f"engine {self.engine.url}: connection lost ({reason})")

    def _take(self, message: Message) -> None:
        kind = message.type
        if kind in ("chunk", "end", "error") and message.get("reply") is not None:
            queue = self._replies.get(int(message["reply"]))
            if queue is None:
                return  # a reply the call no longer reads (cancelled)
            if kind == "chunk":
                codes = message.arrays.get("codes")
                frames = tuple(message["frames"])
                chunk = RemoteChunk(
                    message.arrays["audio"], frames, message["text"], codes, message.get("made", 0.0)
                )
                queue.put_nowait(chunk)
            elif kind == "end":
                queue.put_nowait(_END)
            else:
                queue.put_nowait(EngineUnavailable(f"engine {self.engine.url}: {message['message']}"))
        elif kind == "error" and message.get("fatal"):
            self._lose(f"engine {self.engine.url} refused the session: {message['message']}")
        elif kind == "error":
            logger.warning(f"engine {self.engine.url}: {message['message']}")
        elif kind == "tool_call":
            call = ToolCall(
                str(message["name"]), dict(message.get("arguments") or {}), str(message["call_id"])
            )
            if self.on_tool_call is not None:
                self.on_tool_call(call)
        elif kind == "voice_ready":
            while self._voice_waiters:
                waiter = self._voice_waiters.pop(0)
                if not waiter.done():
                    waiter.set_result(None)
                    break

    def _lose(self, reason: str) -> None:
        if self.lost is not None:
            return
        self.lost = reason
        self.engine.sessions_lost += 1
        logger.error(f"{reason}; the call's replies fail from now on")
        for queue in self._replies.values():
            queue.put_nowait(EngineUnavailable(reason))
        for waiter in self._voice_waiters:
            if not waiter.done():
                waiter.set_result(None)
        if self.on_lost is not None:
            self.on_lost(reason)

    def close(self) -> None:
        """The call is over: end the stream (the engine frees the session); in-flight replies end."""
        if self._closed:
            return
        self._closed = True
        self._outbox.put_nowait(None)
        call = self._call
        if call is not None:  # a stream the engine does not end in time is cut
            try:
                asyncio.get_running_loop().call_later(CLOSE_GRACE_SECS, call.cancel)
            except RuntimeError:
                call.cancel()
        for queue in self._replies.values():
            queue.put_nowait(_END)

    # -- SpeechSession ---------------------------------------------------------------------------

    async def respond(
        self, user_audio_16k: np.ndarray | None = None, *, say: str | None = None
    ) -> AsyncIterator[RemoteChunk]:
        """The reply, streamed from the engine as it makes it (see ChromaSession.respond)."""
        self._start()
        if self.lost is not None:
            raise EngineUnavailable(self.lost)
        if self._closed:
            raise EngineUnavailable(f"engine {self.engine.url}: the session is closed")
        reply = next(self._reply_ids)
        queue: asyncio.Queue = asyncio.Queue()
        self._replies[reply] = queue
        self._current = reply
        self._chunk_ends, self._chunk_texts, self._heard = [], [], None
        arrays = (
            {}
            if user_audio_16k is None
            else {"audio": np.asarray(user_audio_16k, dtype=np.float32).reshape(-1)}
        )
        self._send(encode("respond", arrays, reply=reply, **({} if say is None else {"say": say})))
        first, later = self.engine.reply_timeout
        ended = False
        try:
            while True:
                waited = first if not self._chunk_ends else later
                try:
                    async with asyncio.timeout(waited):  # no task per chunk, unlike wait_for
                        item = await queue.get()
                except TimeoutError:
                    ended = True
                    raise EngineUnavailable(
                        f"engine {self.engine.url}: no word on reply {reply} for {waited:.0f} s"
                    ) from None
                if item is _END or reply in self._cancelled:
                    ended = item is _END
                    break
                if isinstance(item, BaseException):
                    ended = True
                    raise item
                self._chunk_ends.append(item.frames[1])
                self._chunk_texts.append(item.text)
                yield item
        finally:
            self._replies.pop(reply, None)
            if not ended and reply not in self._cancelled:
                self._cancelled.add(reply)
                self._send(encode("cancel", reply=reply))

    def cancel(self) -> None:
        """Barge-in: no further chunk is yielded; the engine stops the reply within one step."""
        reply = self._current
        if reply is None or reply in self._cancelled or reply not in self._replies:
            return
        self._cancelled.add(reply)
        self._send(encode("cancel", reply=reply))
        self._replies[reply].put_nowait(_END)  # wakes the reader of the reply, which stops

    def heard(self, frames: int) -> None:
        self._heard = max(0, int(frames))
        self._send(encode("heard", frames=self._heard))

    def instruct(self, text: str) -> None:
        self._send(encode("instruct", text=text))

    def set_tools(self, tools: Any) -> None:
        self._send(encode("set_tools", tools=tool_descriptions(tools)))

    def tool_result(self, result: Any) -> None:
        self._send(encode("tool_result", result=result))

    def set_voice(self, voice: Any) -> None:
        self._send(_voice_message("set_voice", voice))

    async def prepare_voice(self) -> None:
        """Ask the engine to build the next reply's voice prefix now; returns when it has (or could not)."""
        if self._closed or self.lost is not None:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._voice_waiters.append(waiter)
        self._send(encode("prepare_voice"))
        try:
            await asyncio.wait_for(waiter, VOICE_TIMEOUT_SECS)
        except TimeoutError:
            logger.warning(
                f"engine {self.engine.url}: the next voice was not ready in {VOICE_TIMEOUT_SECS:.0f} s"
            )

    @property
    def kept_text(self) -> str:
        """The last reply's text up to what the caller heard of it, at chunk resolution: the text at the
        first chunk end at or past the frames heard. Exact for chunks of 1 or 2 frames (a text token
        enters every second frame); the engine keeps the exact cut in the conversation itself."""
        if not self._chunk_ends:
            return ""
        heard = self._chunk_ends[-1] if self._heard is None else min(self._heard, self._chunk_ends[-1])
        if heard == 0:
            return ""
        return self._chunk_texts[bisect.bisect_left(self._chunk_ends, heard)]
