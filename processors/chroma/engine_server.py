"""The engine as a service: one model and its batched scheduler, serving call sessions over gRPC.

    server = EngineServer(model, max_sessions=64)
    port = await server.start("127.0.0.1", 7400)      # grpc://127.0.0.1:7400
    await server.wait()                                # until stop()

Each call is one bidirectional stream (engine_wire.SESSION_METHOD) holding one engine session: the
call server's `RemoteSession` (remote.py) sends the session's inputs in order, and gets chunks, tool
calls, reply ends and errors back. Every session's replies run in the model's one scheduler
(scheduler.py), batched with the other calls', whichever call server they come from. A stream that
breaks (the call server died, the network went) ends its session; nothing else notices.

`model` is anything with `new_session(voice, system_prompt, **settings)`, `source` and `device`: the
loaded Chroma model, or a benchmark's stand-in.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

import grpc
import numpy as np
from loguru import logger

from .engine_wire import (
    MAX_MESSAGE_BYTES,
    SERVICE,
    WIRE_VERSION,
    Message,
    WireError,
    decode,
    encode,
)
from .generation import Sampling

# The first message must come this soon after a stream opens (a client that opens and says nothing
# does not hold a session slot).
OPEN_TIMEOUT_SECS = 10.0
# Voices by key, kept so that a voice's prefix (cached per key) is built once per engine.
MAX_VOICES = 256
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Pings both ways find a peer that vanished without closing its connection (a cable, a VM).
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
]


class _ServedSession:
    """One call's session on the engine: its inputs applied in order, its outputs queued for the stream."""

    def __init__(self, session, out: asyncio.Queue):
        self.session = session
        self.out = out
        self.reply: tuple[int, asyncio.Task] | None = None  # the latest reply asked for, by id
        self.tasks: set[asyncio.Task] = set()
        session.on_tool_call = self._tool_call

    def _tool_call(self, call) -> None:
        self.out.put_nowait(
            encode("tool_call", name=call.name, arguments=call.arguments, call_id=call.call_id)
        )

    def apply(self, message: Message, voices: _Voices) -> None:
        kind, session = message.type, self.session
        if kind == "respond":
            audio = message.arrays.get("audio")
            previous = self.reply[1] if self.reply is not None else None
            reply_id = int(message["reply"])
            task = self._spawn(self._respond(reply_id, audio, message.get("say"), previous))
            self.reply = (reply_id, task)
        elif kind == "cancel":
            if self.reply is not None and self.reply[0] == int(message["reply"]):
                session.cancel()
                self.reply[1].cancel()
        elif kind == "heard":
            session.heard(int(message["frames"]))
        elif kind == "instruct":
            session.instruct(str(message["text"]))
        elif kind == "set_tools":
            session.set_tools(list(message["tools"]))
        elif kind == "tool_result":
            session.tool_result(message.get("result"))
        elif kind == "set_voice":
            session.set_voice(voices.take(message))
        elif kind == "prepare_voice":
            self._spawn(self._prepare_voice())
        else:
            raise WireError(
                f"message type {kind!r}; expected respond, cancel, heard, instruct, set_tools, "
                "tool_result, set_voice or prepare_voice"
            )

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _respond(self, reply: int, audio: np.ndarray | None, say: str | None, previous) -> None:
        if previous is not None and not previous.done():
            await asyncio.wait({previous})  # replies take turns, as they do in one process
        try:
            # Read as fast as the scheduler makes chunks, as the pipeline's service reads an in-process
            # session: a reply's row never waits on the network, and gRPC's flow control holds the rest.
            async for chunk in self.session.respond(audio, say=say):
                arrays = {"audio": np.asarray(chunk.audio, dtype=np.float32)}
                codes = getattr(chunk, "codes", None)
                if codes is not None:
                    arrays["codes"] = np.asarray(codes, dtype=np.int32)
                # made: when a consumer in this process would have had it (the same clock as a call server
                # on this host: the benchmark's measure of what the service adds)
                self.out.put_nowait(
                    encode(
                        "chunk",
                        arrays,
                        reply=reply,
                        frames=list(chunk.frames),
                        text=chunk.text,
                        made=time.monotonic(),
                    )
                )
        except asyncio.CancelledError:
            self.out.put_nowait(encode("end", reply=reply, cancelled=True))
            raise
        except Exception as exc:  # this reply fails, not the session: the call server says sorry for it
            logger.opt(exception=exc).warning(f"engine: reply {reply} failed: {exc!r}")
            self.out.put_nowait(encode("error", reply=reply, message=f"{type(exc).__name__}: {exc}"))
            return
        self.out.put_nowait(encode("end", reply=reply))

    async def _prepare_voice(self) -> None:
        try:
            await self.session.prepare_voice()
        except Exception as exc:
            self.out.put_nowait(encode("error", message=f"voice: {type(exc).__name__}: {exc}"))
        self.out.put_nowait(encode("voice_ready"))

    async def close(self) -> None:
        self.session.cancel()
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(BaseException):
                await task


class _Voices:
    """Voices sent by call servers, by key: a voice's reference crosses once per message that names it,
    but the session (and its prefix cache) sees the same voice object for the same key."""

    def __init__(self):
        self._by_key: OrderedDict[str, Any] = OrderedDict()

    def take(self, message: Message):
        from .session import SpeakingVoice

        spec = message.get("voice")
        if not isinstance(spec, dict) or not isinstance(spec.get("key"), str):
            raise WireError(
                f"'voice' is {spec!r}; expected {{key, name, transcript}} with the reference as "
                "array 'voice_audio'"
            )
        key = spec["key"]
        if key not in self._by_key:
            audio = message.arrays.get("voice_audio")
            if audio is None:
                raise WireError(f"voice {key[:12]}: no reference audio (array 'voice_audio', 24 kHz float32)")
            voice = SpeakingVoice(
                np.array(audio, dtype=np.float32).reshape(-1),
                str(spec.get("transcript", "")),
                key,
                str(spec.get("name", "")),
            )
            self._by_key[key] = voice
            while len(self._by_key) > MAX_VOICES:
                self._by_key.popitem(last=False)
        self._by_key.move_to_end(key)
        return self._by_key[key]


class EngineServer:
    """Serves `model`'s sessions over gRPC: at most `max_sessions` calls at once.

    `reasoner`: gives each new session the factory that picks its thinker's tokens (tests run a
    scripted conversation on the tiny model this way; see scripted.py). `status`: the scheduler's
    status (default: the model's `FrameScheduler`, for a Chroma model)."""

    def __init__(
        self,
        model,
        *,
        max_sessions: int = 64,
        reasoner: Callable[[], Callable] | None = None,
        status: Callable[[], dict] | None = None,
    ):
        if max_sessions < 1:
            raise ValueError(f"max_sessions is {max_sessions}, expected at least 1")
        self.model = model
        self.max_sessions = max_sessions
        self.reasoner = reasoner
        if status is None:
            from .modeling import ChromaModel
            from .scheduler import FrameScheduler

            status = FrameScheduler.for_model(model).status if isinstance(model, ChromaModel) else dict
        self._scheduler_status = status
        self.sessions: set[_ServedSession] = set()
        self.opened = 0  # sessions opened since start
        self._voices = _Voices()
        self._server: grpc.aio.Server | None = None

    # -- lifecycle ------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on host:port (0: any free port) and return the port."""
        server = grpc.aio.server(options=SERVER_OPTIONS)
        handlers = {
            "Session": grpc.stream_stream_rpc_method_handler(self._session),
            "Status": grpc.unary_unary_rpc_method_handler(self._status),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        bound = server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise OSError(
                f"cannot listen on {host}:{port}; expected a free port on an address of this machine"
            )
        await server.start()
        self._server = server
        logger.info(
            f"engine: serving {getattr(self.model, 'source', 'model')} on grpc://{host}:{bound} "
            f"(at most {self.max_sessions} sessions)"
        )
        return bound

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop taking streams; those open get `grace` seconds, then end (their calls say goodbye)."""
        if self._server is not None:
            await self._server.stop(grace)

    # -- status ---------------------------------------------------------------------

    def status(self) -> dict:
        """The scheduler's status and this service's: sessions open and the most it takes."""
        state = dict(self._scheduler_status())
        state.update(
            wire_version=WIRE_VERSION,
            model=str(getattr(self.model, "source", "")),
            device=str(getattr(self.model, "device", "")),
            is_tiny=bool(getattr(getattr(self.model, "config", None), "is_tiny", False)),
            open_sessions=len(self.sessions),
            max_sessions=self.max_sessions,
            sessions_opened=self.opened,
        )
        return state

    async def _status(self, request: bytes, context) -> bytes:
        return encode("status", status=self.status())

    # -- sessions -------------------------------------------------------------------

    async def _session(self, requests: AsyncIterator[bytes], context) -> AsyncIterator[bytes]:
        try:
            first = decode(await asyncio.wait_for(anext(requests), OPEN_TIMEOUT_SECS))
        except (StopAsyncIteration, TimeoutError):
            return
        except WireError as exc:
            yield encode("error", message=f"the first message is not readable: {exc}", fatal=True)
            return
        served, problem = self._open(first)
        if served is None:
            logger.warning(f"engine: session refused: {problem}")
            yield encode("error", message=problem, fatal=True)
            return
        self.sessions.add(served)
        self.opened += 1
        reader = asyncio.get_running_loop().create_task(self._read(requests, served))
        try:
            yield encode("opened", wire_version=WIRE_VERSION, model=str(getattr(self.model, "source", "")))
            while True:
                item = await served.out.get()
                if item is None:
                    break
                yield item
        finally:
            self.sessions.discard(served)
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            await served.close()

    def _open(self, message: Message) -> tuple[_ServedSession | None, str]:
        if message.type != "open":
            return None, f"the first message is {message.type!r}; expected 'open'"
        if message.get("wire_version") != WIRE_VERSION:
            return None, (
                f"wire version {message.get('wire_version')!r}; this engine speaks version "
                f"{WIRE_VERSION} (update the call server or the engine so that they match)"
            )
        if len(self.sessions) >= self.max_sessions:
            return None, f"engine at capacity: {len(self.sessions)} of max_sessions {self.max_sessions}"
        try:
            voice = self._voices.take(message)
            sampling = Sampling(**dict(message.get("sampling") or {}))
            settings = {
                k: int(message[k]) for k in ("chunk_frames", "lookahead", "max_frames") if k in message.fields
            }
            if self.reasoner is not None:
                settings["thinker_stream"] = self.reasoner()
            session = self.model.new_session(
                voice, str(message.get("system_prompt", "")), sampling=sampling, **settings
            )
        except Exception as exc:
            return None, f"cannot open a session: {type(exc).__name__}: {exc}"
        return _ServedSession(session, asyncio.Queue()), ""

    async def _read(self, requests: AsyncIterator[bytes], served: _ServedSession) -> None:
        """The call server's messages, applied in the order sent; the end of them ends the session."""
        try:
            async for data in requests:
                try:
                    served.apply(decode(data), self._voices)
                except Exception as exc:  # a bad message fails that message, not the session
                    logger.warning(f"engine: a session's message was refused: {exc}")
                    served.out.put_nowait(encode("error", message=f"{type(exc).__name__}: {exc}"))
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            served.out.put_nowait(None)


class EngineThread:
    """An `EngineServer` on a thread of its own, with its own event loop (tests and benchmarks):

    with EngineThread(model) as url:      # grpc://127.0.0.1:PORT
        ...
    """

    def __init__(self, model, host: str = "127.0.0.1", port: int = 0, **server_args):
        self.server = EngineServer(model, **server_args)
        self._address = (host, port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self, timeout: float = 30.0) -> str:
        started: Future = Future()

        def run() -> None:
            async def main() -> None:
                try:
                    port = await self.server.start(*self._address)
                except BaseException as exc:
                    started.set_exception(exc)
                    return
                self._loop = asyncio.get_running_loop()
                self._stopped = asyncio.Event()
                started.set_result(port)
                await self._stopped.wait()  # not the server's own end: stop() finishes first

            asyncio.run(main())

        self._thread = threading.Thread(target=run, name="engine-server", daemon=True)
        self._thread.start()
        self.url = f"grpc://{self._address[0]}:{started.result(timeout)}"
        return self.url

    def stop(self, grace: float | None = 0.0, timeout: float = 30.0) -> None:
        async def stop() -> None:
            try:
                await self.server.stop(grace)
            finally:
                self._stopped.set()

        if self._loop is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
