"""The SIP line's glue: the `SipCallHandler` that gives each dialog its RTP ports, its SDP
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
import ipaddress
import itertools
import os
import re
import socket
from collections import deque
from dataclasses import dataclass, field

from loguru import logger

from transports.sip.auth import AllowList, DigestAuthenticator
from transports.sip.dialog import CallRejected, Dialog
from transports.sip.outbound import Credentials, DialFailed, SipOutboundCall, offer_sdp
from transports.sip.rtp import NoFreePort, PortPool, RtpSession
from transports.sip.sdp import Answer, SdpError, negotiate
from transports.sip.server import SipServer
from transports.sip.transaction import SIP_DEFAULT_PORT
from transports.sip.transport import SipCallTransport
from transports.sip.values import SipParseError, SipUri

from ..call import Call
from ..outbound import OutboundError, PlacedCall, answering_screen
from ..runtime import AgentRuntime
from ..spec import SIPTransportSpec

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
    line: SipCallTransport | None = None
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
        if dialog.ended:
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
        line = media.line = SipCallTransport(
            media.session, name=f"sip-{call_id}", transfer=dialog.refer, hang_up=dialog.hang_up
        )
        self.runtime.release(_reservation(dialog))  # the call itself counts from here
        try:
            media.call = self.runtime.new_call(line, call_id=call_id)
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
            await media.line.hang_up()

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


# Outbound: the SIP route of agent.outbound.place_call ------------------------------------------------

# One pool per RTP range for the calls this process places (inbound calls have the server's own pool:
# a port either holds is skipped by the other, RtpSession.open moves on).
_outbound_pools: dict[tuple[str, int, int], PortPool] = {}


async def sip_outbound(runtime: AgentRuntime, placed: PlacedCall) -> None:
    """Dial `placed.to` (a SIP URI directly, a number through `transports.sip.trunk`), run the agent on
    the answered call with the answering-machine gate in front, and hang up (or take the callee's BYE).
    The outcome goes to `placed`; returns when the call is over."""
    spec = runtime.spec.transports.sip
    target, hop, from_user, from_host, credentials = _outbound_target(spec, placed)
    dialog = SipOutboundCall(
        target,
        local_host=spec.host,
        next_hop=hop,
        from_user=from_user,
        from_host=from_host,
        credentials=credentials,
        on_progress=lambda status, reason: placed.note("ringing" if status == 180 else "progress", status=status),
    )
    key = (spec.host, *spec.rtp_ports)
    pool = _outbound_pools.setdefault(key, PortPool(*key))
    session: RtpSession | None = None
    try:
        await dialog.open()
        local_ip = dialog.contact_host = _local_address(spec, dialog.hop_address[0])
        session = await RtpSession.open(pool, name=placed.id)
        placed.note("sip_invite", call_id=dialog.call_id, target=str(target))
        answer_sdp = await dialog.dial(
            offer_sdp(local_ip, session.port, tuple(spec.codecs)), runtime.spec.outbound.ring_timeout
        )
        try:
            answer = negotiate(answer_sdp, local_ip=local_ip, local_port=session.port, codecs=tuple(spec.codecs))
        except SdpError as exc:
            placed.finish("failed", f"the callee's SDP answer cannot be used: {exc}")
            return
        session.configure(answer)
        line = SipCallTransport(session, name=f"sip-{placed.id}", hang_up=dialog.hang_up)
        call = runtime.new_call(line, call_id=placed.id, screen=answering_screen(runtime, placed))
        placed.attach(call)
        session.start()
        await _run_placed(call, dialog, session)
        placed.finish("answered", "the callee hung up" if dialog.ended.is_set() and not call.ended_by_agent else "")
    except DialFailed as exc:
        placed.finish(exc.outcome, f"SIP {exc.status or '-'} {exc.reason}")
    except NoFreePort as exc:
        placed.finish("failed", str(exc))
    finally:
        await dialog.hang_up()
        if session is not None:
            session.close()


async def _run_placed(call: Call, dialog: SipOutboundCall, session: RtpSession) -> None:
    """The call runs until the agent ends it, the callee sends BYE, or RTP stops coming."""
    running = asyncio.create_task(call.run(), name=f"call-{call.stats.call_id}")
    peer_bye = asyncio.create_task(dialog.ended.wait())
    try:
        while not running.done():
            await asyncio.wait({running, peer_bye}, timeout=WATCH_INTERVAL_SECS, return_when=asyncio.FIRST_COMPLETED)
            if peer_bye.done() and not running.done():
                await call.cancel("SIP BYE")
                break
            if session.idle_seconds >= RTP_TIMEOUT_SECS and not running.done():
                logger.warning(f"call {call.stats.call_id}: no RTP for {RTP_TIMEOUT_SECS:.0f} s, hanging up")
                await call.cancel("no RTP")
                break
        await asyncio.wait_for(asyncio.shield(running), CLOSE_GRACE_SECS)
    except TimeoutError:
        running.cancel()
    finally:
        peer_bye.cancel()
    if not dialog.ended.is_set():
        await session.drain(DRAIN_SECS)  # the agent's last words go out before its BYE


def _local_address(spec: SIPTransportSpec, remote_ip: str) -> str:
    """The address the callee reaches us at (Contact, SDP): public_address, else host, else (host 0.0.0.0)
    the address this machine sends to `remote_ip` from. A loopback host cannot call out of the machine."""
    if spec.public_address:
        return spec.public_address
    try:
        host, remote = ipaddress.ip_address(spec.host), ipaddress.ip_address(remote_ip)
    except ValueError:
        return spec.host
    if host.is_unspecified:
        with socket.socket(socket.AF_INET6 if remote.version == 6 else socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((remote_ip, SIP_DEFAULT_PORT))  # UDP: picks the route, sends nothing
            return probe.getsockname()[0]
    if host.is_loopback and not remote.is_loopback:
        raise OutboundError(
            f"transports.sip.host is {spec.host}: a call to {remote_ip} cannot leave this machine from it; "
            "set host to this machine's address (or 0.0.0.0, with public_address behind NAT)"
        )
    return spec.host


def _outbound_target(spec: SIPTransportSpec, placed: PlacedCall):
    """(Request-URI, next hop or None, From user, From host or None, credentials or None) for `placed.to`."""
    if placed.route == "sip":
        try:
            target = SipUri.parse(placed.to)
        except SipParseError as exc:
            raise OutboundError(f"--to {placed.to!r} is not a SIP URI: {exc}") from None
        return target, None, placed.from_ or "agent", None, None
    trunk = spec.trunk
    if trunk is None:
        raise OutboundError("transports.sip.trunk is not configured; a number cannot be dialled over SIP")
    trunk_uri = SipUri.parse(f"sip:{trunk.address}")  # checked as host[:port] when the agent file loaded
    host, port = trunk_uri.host, trunk_uri.port or SIP_DEFAULT_PORT
    number = re.sub(r"[ ().-]", "", placed.to)
    credentials = None
    if trunk.username:
        password = os.environ.get(trunk.password_env)
        if not password:
            raise OutboundError(
                f"transports.sip.trunk: the environment variable {trunk.password_env} holding the password for "
                f"{trunk.username!r} is not set"
            )
        credentials = Credentials(trunk.username, password, trunk.realm)
    from_user = re.sub(r"[ ().-]", "", placed.from_ or trunk.caller_id or "agent")
    return SipUri(host=host, user=number, port=port), (host, port), from_user, trunk.address, credentials
