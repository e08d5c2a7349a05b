"""SIP dialogs to agent calls: the `SipCallHandler` that gives each dialog its RTP ports, its SDP
answer and a running agent pipeline, and frees all of it once the dialog ends.

    server = sip_server(runtime)          # SipServer + SipCalls from the agent's transports.sip
    await server.start()
    ...
    await server.stop()                   # BYE to every call; each one's end() frees its media
    await server.handler.close()          # waits (bounded) for the pipelines to finish

offer → a session of the runtime's max_sessions held for the call (none: 486), a port pair from the
pool (none left: 503) and `sdp.negotiate`; a re-INVITE renegotiates
and reconfigures the session (hold, resume, new address). start (ACK) → the pipeline runs on a
`SipCallTransport`. The agent ending the call (EndFrame) sends BYE. end → the call is cancelled,
the session closed and its ports returned, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections import deque
from dataclasses import dataclass, field

from loguru import logger

from agent.runtime import AgentRuntime, Call
from agent.spec import SIPTransportSpec

from .auth import AllowList, DigestAuthenticator
from .dialog import CallRejected, Dialog
from .rtp import NoFreePort, PortPool, RtpSession
from .sdp import Answer, negotiate
from .server import SipServer
from .transport import SIP_RATE, SipCallTransport
from .values import SipParseError, SipUri

RTP_TIMEOUT_SECS = 30.0  # no RTP this long on an active, un-held call: the peer is gone
WATCH_INTERVAL_SECS = 1.0
DRAIN_SECS = 0.3  # the agent's last words go out before its BYE
CLOSE_GRACE_SECS = 3.0

_suffixes = itertools.count(2)


class SipConfigError(RuntimeError):
    """The SIP transport cannot start with this configuration."""


@dataclass(eq=False)
class _Media:
    """One dialog's media and, once it is confirmed, its agent call."""

    session: RtpSession
    answer: Answer
    call: Call | None = None
    task: asyncio.Task | None = None
    watchdog: asyncio.Task | None = None
    ended: bool = False
    tasks: set[asyncio.Task] = field(default_factory=set)


class SipCalls:
    """Implements SipCallHandler for an AgentRuntime."""

    def __init__(
        self, runtime: AgentRuntime, spec: SIPTransportSpec, *, rtp_timeout: float = RTP_TIMEOUT_SECS
    ):
        self.runtime = runtime
        self.spec = spec
        self.local_ip = spec.public_address or spec.host
        self.codecs = tuple(spec.codecs)
        self.pool = PortPool(spec.host, *spec.rtp_ports)
        self.rtp_timeout = rtp_timeout
        self._watch_interval = min(WATCH_INTERVAL_SECS, rtp_timeout / 3)
        self.media: dict[Dialog, _Media] = {}
        # (call id, reason, RTP counters) of the most recent ended calls, for logs and tests.
        self.finished: deque[tuple[str, str, dict[str, int]]] = deque(maxlen=100)
        self._tasks: set[asyncio.Task] = set()

    # SipCallHandler ----------------------------------------------------------------------------

    async def offer(self, dialog: Dialog, sdp: bytes) -> bytes:
        media = self.media.get(dialog)
        if media is not None:
            # re-INVITE: hold, resume or moved media. On SdpError the call keeps its old state (488).
            answer = negotiate(
                sdp,
                local_ip=self.local_ip,
                local_port=media.session.port,
                codecs=self.codecs,
                previous=media.answer,
            )
            media.answer = answer
            media.session.configure(answer)
            logger.info(
                f"call {dialog.call_id}: media now {answer.direction} to {answer.remote_host}:{answer.remote_port}"
            )
            return answer.sdp.encode()
        # Held from before the answer until the ACK starts the pipeline (or the dialog ends), so a call
        # answered and awaiting its ACK counts against max_sessions. Taken before the first await:
        # two INVITEs at once cannot both have the last session.
        key = _reservation(dialog)
        if (busy := self.runtime.reserve(key)) is not None:
            logger.warning(f"call {dialog.call_id} refused: {busy}")
            raise CallRejected(486, f"Busy Here ({busy})")
        try:
            session = await RtpSession.open(self.pool, name=dialog.call_id)
        except NoFreePort as exc:
            self.runtime.release(key)
            logger.warning(f"call {dialog.call_id} refused: {exc}")
            raise CallRejected(503, "No Free RTP Port") from exc
        try:
            answer = negotiate(sdp, local_ip=self.local_ip, local_port=session.port, codecs=self.codecs)
            session.configure(answer)
        except BaseException:
            session.close()
            self.runtime.release(key)
            raise
        # CANCEL or BYE came while we bound the ports: the server will not call end() for us.
        if getattr(dialog, "ended", False):
            session.close()
            self.runtime.release(key)
            raise CallRejected(487)
        self.media[dialog] = _Media(session, answer)
        return answer.sdp.encode()

    async def start(self, dialog: Dialog) -> None:
        media = self.media.get(dialog)
        if media is None or media.ended or media.call is not None:
            return
        call_id = dialog.call_id
        if call_id in self.runtime.calls:  # a Call-ID reused while its first call still runs
            call_id = f"{call_id}#{next(_suffixes)}"
        transport = SipCallTransport(media.session, name=f"sip-{call_id}", transfer=dialog.refer)
        self.runtime.release(_reservation(dialog))  # the call itself counts from here
        try:
            media.call = self.runtime.new_call(
                transport, kind="sip", call_id=call_id, in_rate=SIP_RATE, out_rate=SIP_RATE
            )
        except Exception:
            logger.exception(f"call {dialog.call_id}: could not build the agent's pipeline")
            self._spawn(dialog.hang_up())
            return
        media.call.flow_state["caller_number"] = _caller_number(dialog)
        invite = dialog.invite
        media.call.identify({"sip_call_id": dialog.call_id}, caller=str(invite.from_.uri), callee=str(invite.to.uri))
        media.session.start()
        media.task = self._spawn(self._run(dialog, media))
        media.watchdog = self._spawn(self._watch(dialog, media))

    async def end(self, dialog: Dialog, reason: str) -> None:
        self.runtime.release(_reservation(dialog))
        media = self.media.pop(dialog, None)
        if media is None:
            return
        cancelled_already = media.ended  # by the silence watchdog
        media.ended = True
        stats = media.session.stats()
        media.session.close()
        self.finished.append((dialog.call_id, reason, stats))
        logger.info(f"call {dialog.call_id} ended ({reason}); RTP {stats}")
        if media.watchdog is not None and media.watchdog is not asyncio.current_task():
            media.watchdog.cancel()
        running = (
            media.task is not None and not media.task.done() and media.task is not asyncio.current_task()
        )
        if media.call is not None and running and not cancelled_already:
            # In the background: the server waits on end() before it answers or goes on.
            self._spawn(media.call.cancel(f"SIP {reason}"))

    # The call ----------------------------------------------------------------------------------

    async def _run(self, dialog: Dialog, media: _Media) -> None:
        try:
            await media.call.run()
        except Exception:
            logger.exception(f"call {dialog.call_id} failed")
        if not media.ended:
            # The pipeline ended by itself (the agent hung up, or it failed): tell the caller.
            await media.session.drain(DRAIN_SECS)
            await dialog.hang_up()

    async def _watch(self, dialog: Dialog, media: _Media) -> None:
        """A peer that vanished without BYE must not hold a call slot (and a port pair) forever."""
        while not media.ended:
            await asyncio.sleep(self._watch_interval)
            answer = media.answer
            if answer.on_hold or not answer.receiving or media.session.idle_seconds < self.rtp_timeout:
                continue
            logger.warning(f"call {dialog.call_id}: no RTP for {self.rtp_timeout:.0f} s, hanging up")
            self.runtime.metrics.sip_refused("rtp_timeout")
            media.ended = True
            if media.call is not None:
                with contextlib.suppress(Exception):
                    await media.call.cancel("no RTP")
            await dialog.hang_up()
            return

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """After the server stopped: wait (bounded) for every call's pipeline to finish."""
        for media in list(self.media.values()):
            media.ended = True
            media.session.close()
            if media.call is not None:
                self._spawn(media.call.cancel("server shutting down"))
        for dialog in self.media:
            self.runtime.release(_reservation(dialog))
        self.media.clear()
        pending = set(self._tasks)
        if pending:
            _done, late = await asyncio.wait(pending, timeout=CLOSE_GRACE_SECS)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)


def sip_server(runtime: AgentRuntime, spec: SIPTransportSpec | None = None, **server_options) -> SipServer:
    """The agent's SIP server: allow-list, digest auth (password from the environment), max calls."""
    spec = spec or runtime.spec.transports.sip
    auth = None
    if spec.auth is not None:
        password = os.environ.get(spec.auth.password_env)
        if not password:
            raise SipConfigError(
                f"transports.sip.auth: the environment variable {spec.auth.password_env} holding the SIP "
                f"password for user {spec.auth.username!r} is not set"
            )
        auth = DigestAuthenticator(
            spec.auth.realm, {spec.auth.username: password}, algorithm=spec.auth.algorithm
        )
    server = _RecordedSipServer(
        SipCalls(runtime, spec),
        host=spec.host,
        port=spec.port,
        public_address=spec.public_address,
        allow=AllowList(spec.allow),
        auth=auth,
        max_calls=spec.max_calls,
        busy=runtime.busy_reason,
        on_refusal=runtime.metrics.sip_refused,
        **server_options,
    )
    runtime.metrics.set_gauges("sip", lambda: _gauges(server))
    return server


class _RecordedSipServer(SipServer):
    """The SIP server whose busy refusals (486 to a new INVITE, from the server's own check or the
    handler's) are kept as call records ending `busy`."""

    def __init__(self, handler: SipCalls, **options):
        super().__init__(handler, **options)
        self._runtime = handler.runtime

    def respond(self, tx, status: int, reason: str | None = None, **options) -> None:
        request = tx.request
        if status == 486 and request.method == "INVITE":
            try:
                self._runtime.record_refusal(
                    "sip", reason or "Busy Here", transport_ids={"sip_call_id": request.call_id},
                    caller=str(request.from_.uri), callee=str(request.to.uri),
                )  # fmt: skip
            except Exception:  # a refusal is answered whatever its record does
                logger.exception("SIP busy refusal could not be recorded")
        super().respond(tx, status, reason, **options)


def _gauges(server: SipServer):
    yield "chroma_sip_calls", "SIP calls held: ringing, awaiting their ACK or running.", len(server.dialogs)
    yield (
        "chroma_sip_calls_awaiting_ack",
        "SIP calls answered 200 OK whose ACK has not come; each holds a session and an RTP port pair.",
        server.awaiting_ack,
    )


def _reservation(dialog: Dialog) -> str:
    return f"sip-dialog-{id(dialog)}"


def _caller_number(dialog: Dialog) -> str:
    """The caller's number for the flow: the user part of the INVITE's From (sip:+15551230042@host),
    or "" for a tel: URI or none at all."""
    try:
        return SipUri.parse(str(dialog.invite.from_.uri)).user or ""
    except SipParseError:
        return ""
