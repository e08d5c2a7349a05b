"""The SIP user agent server over UDP (RFC 3261): accepts calls from a trunk or PBX and hands each
one's SDP to a `SipCallHandler`, which owns the media.

One datagram in: parse (malformed ones are answered 400 when they can be, else dropped and counted),
route through the server transactions, then by method: a new INVITE makes a `Dialog`, in-dialog
requests go to theirs, responses go to the client transaction of our own BYE or REFER.

The server is each dialog's `DialogHost`: a dialog sends, starts client transactions and leaves the
table only through that Protocol, and the server changes a dialog's state only through its methods.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from types import MappingProxyType
from typing import Any

from loguru import logger

from .auth import AllowList, DigestAuthenticator
from .dialog import ALLOW, SDP, CallRejected, Dialog, LocalEnd, SipCallHandler
from .message import SipMessage, SipRequest, SipResponse, canonical_name, new_tag
from .transaction import (
    Address,
    ClientTransaction,
    DialogAck,
    ServerTransaction,
    TransactionLayer,
    response_address,
)
from .values import _TOKEN, SIP_VERSION, CSeq, SipParseError, Via, _split_commas

__all__ = ["CallRejected", "Dialog", "SipCallHandler", "SipServer"]

# Methods we know but do not accept: 405 with Allow (§8.2.1); anything else is 501.
NOT_ALLOWED = frozenset({"REGISTER", "SUBSCRIBE", "PUBLISH", "MESSAGE", "UPDATE", "PRACK", "REFER"})
SHUTDOWN_GRACE = 2.0  # seconds stop() waits for BYE answers and pending offers
_LOGGED_LIMIT = 4096  # (source, kind) pairs remembered for log-once; a flood must not grow it forever
# Final responses that refuse a request, by the reason they are counted under (on_refusal).
REFUSALS = {
    400: "bad_request",
    403: "forbidden",
    405: "method_not_allowed",
    415: "unsupported_media_type",
    416: "unsupported_uri_scheme",
    420: "bad_extension",
    482: "loop_detected",
    486: "busy",
    488: "bad_sdp",
    500: "server_error",
    501: "not_implemented",
    503: "unavailable",
}


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, server: SipServer):
        self.server = server

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.server.datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a peer that went away; retransmission timers deal with it.
        logger.debug("SIP socket error: {}", exc)


class SipServer:
    def __init__(
        self,
        handler: SipCallHandler,
        *,
        host: str = "127.0.0.1",
        port: int = 5060,
        public_address: str | None = None,
        allow: AllowList | None = None,
        auth: DigestAuthenticator | None = None,
        max_calls: int = 20,
        user_agent: str = "chroma-agents",
        t1: float = 0.5,
        t2: float = 4.0,
        t4: float = 5.0,
        busy: Callable[[], str | None] | None = None,
        on_refusal: Callable[[str], None] | None = None,
    ):
        """`busy`: why the application cannot take one more call now (None: it can), asked before each
        new INVITE (486 when busy) and OPTIONS (503, so a dispatcher stops sending calls).
        `on_refusal`: told the reason each time a request is refused or a call ends by a timeout
        ('bad_request', 'forbidden', 'busy', 'bad_sdp', 'no_ack', ...; see REFUSALS)."""
        self.handler = handler
        self.busy = busy
        self.on_refusal = on_refusal
        self.host, self.port, self.public_address = host, port, public_address
        self.allow = allow or AllowList([])
        self.auth = auth
        self.max_calls = max_calls
        self.user_agent = user_agent
        self.t1, self.t2, self.t4 = t1, t2, t4
        self._dialogs: dict[str, Dialog] = {}  # changed only by _add and forget
        self.counts: Counter[str] = Counter()
        self.transactions = TransactionLayer(self.send, t1=t1, t2=t2, t4=t4)
        self._client_transactions: dict[str, ClientTransaction] = {}
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task] = set()
        self._logged: set[tuple[str, str]] = set()
        self._stopping = False
        self._draining = False

    # Lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Endpoint(self), local_addr=(self.host, self.port)
        )
        self.port = self._transport.get_extra_info("sockname")[1]
        logger.info("SIP listening on udp {}:{}", self.host, self.port)

    def drain(self) -> None:
        """Take no new calls (INVITE and OPTIONS answered 503) while the calls already here go on."""
        self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    async def stop(self) -> None:
        """BYE to every answered call, end(..., 'shutdown') for all, then close the socket."""
        self._stopping = True
        dialogs = list(self._dialogs.values())
        ending = [self._spawn(d.end("shutdown", send_bye=True), "shutdown") for d in dialogs]
        pending = ending + [t for t in self._tasks if t not in ending]
        if pending:
            _, late = await asyncio.wait(pending, timeout=SHUTDOWN_GRACE)
            for transaction in list(self._client_transactions.values()):
                transaction.cancel()
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        self.transactions.close()
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # Sending -----------------------------------------------------------------------------------

    def send(self, data: bytes, addr: Address) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        try:
            self._transport.sendto(data, addr)
        except (OSError, ValueError) as exc:
            self._note("send_error", addr, f"could not send to {addr[0]}:{addr[1]}: {exc}")

    def start_request(self, request: SipRequest, addr: Address) -> ClientTransaction:
        transaction = ClientTransaction(self.send, request, addr, self.t1, self.t2)
        self._client_transactions[transaction.branch] = transaction
        transaction.result.add_done_callback(
            lambda _: self._client_transactions.pop(transaction.branch, None)
        )
        transaction.start()
        return transaction

    def respond(
        self,
        tx: ServerTransaction,
        status: int,
        reason: str | None = None,
        *,
        to_tag: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        refusal: str | None = None,
    ) -> None:
        """`refusal`: the reason a refusing status is counted under, when not the status's own ("": not
        counted)."""
        if kind := REFUSALS.get(status) if refusal is None else refusal:
            self.refused(kind)
        headers = [*headers, ("Server", self.user_agent)]
        # §8.2.6.2: every response but 100 Trying carries our To tag.
        tag = None if status == 100 else to_tag or new_tag()
        tx.respond(tx.request.response(status, reason, to_tag=tag, headers=headers, body=body))

    def refused(self, kind: str) -> None:
        if self.on_refusal is not None:
            try:
                self.on_refusal(kind)
            except Exception:
                logger.exception("SIP on_refusal failed")

    # The dialog table ----------------------------------------------------------------------------

    @property
    def dialogs(self) -> MappingProxyType[str, Dialog]:
        """The calls held, by Call-ID: ringing, awaiting their ACK or running (read-only)."""
        return MappingProxyType(self._dialogs)

    def _add(self, dialog: Dialog) -> None:
        self._dialogs[dialog.call_id] = dialog

    def forget(self, dialog: Dialog) -> None:
        """A dialog leaves the table (it calls this itself as it ends)."""
        if self._dialogs.get(dialog.call_id) is dialog:
            del self._dialogs[dialog.call_id]

    # Capacity ----------------------------------------------------------------------------------

    @property
    def awaiting_ack(self) -> int:
        """Calls answered 200 OK whose ACK has not come: each holds a call slot and its media."""
        return sum(1 for d in self._dialogs.values() if d.answered and not d.confirmed and not d.ended)

    def not_ready_reason(self) -> str | None:
        """Why a new call would be refused now, or None. Every dialog counts against max_calls,
        ringing, awaiting its ACK or running."""
        if self._stopping:
            return "shutting down"
        if self._draining:
            return "draining"
        if len(self._dialogs) >= self.max_calls:
            return f"{len(self._dialogs)} calls of max_calls {self.max_calls}"
        if self.busy is not None:
            return self.busy()
        return None

    # Ending dialogs ----------------------------------------------------------------------------

    def on_no_ack(self, dialog: Dialog) -> None:
        self.refused("no_ack")
        logger.warning(
            "no ACK for our 2xx on call {} from {}: hanging up", dialog.call_id, dialog.remote_addr
        )
        self._spawn(dialog.end("no_ack", send_bye=True), "no_ack")

    # Receiving ---------------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Address) -> None:
        """Never raises: whatever a peer sends, the other calls go on."""
        try:
            self._receive(data, addr)
        except Exception:
            self.counts["internal_error"] += 1
            logger.exception("SIP datagram from {}:{} could not be handled", *addr[:2])

    def _receive(self, data: bytes, addr: Address) -> None:
        if not data.strip(b"\r\n"):
            self.counts["keepalive"] += 1  # RFC 5626 CRLF keep-alive
            return
        try:
            message = SipMessage.parse(data)
        except SipParseError as exc:
            self._malformed(data, addr, str(exc))
            return
        if isinstance(message, SipResponse):
            self._on_response(message, addr)
            return
        if not self.allow.allows(addr[0]):
            self._note("forbidden", addr, f"{message.method} from {addr[0]} refused: not on the allow-list")
            if (tx := self.transactions.receive(message, addr)) is not None and isinstance(
                tx, ServerTransaction
            ):
                self.respond(tx, 403, "Forbidden")
            return
        result = self.transactions.receive(message, addr)
        if isinstance(result, DialogAck):
            self._on_ack(result.request)
        elif result is not None:
            try:
                self._on_request(result, addr)
            except SipParseError as exc:
                self._note("bad_request", addr, f"{message.method} from {addr[0]} refused: {exc}")
                self.respond(result, 400, _bad_request(str(exc)))

    def _malformed(self, data: bytes, addr: Address, problem: str) -> None:
        request = _salvage_request(data)
        if request is None or request.method == "ACK":
            self._note("unparseable", addr, f"dropped a datagram from {addr[0]}:{addr[1]}: {problem}")
            return
        self._note("bad_request", addr, f"{request.method} from {addr[0]}:{addr[1]} answered 400: {problem}")
        self.refused("bad_request")
        try:
            response = request.response(
                400, _bad_request(problem), to_tag=new_tag(), headers=[("Server", self.user_agent)]
            )
            self.send(bytes(response), response_address(request, addr))
        except SipParseError:
            pass

    def _on_response(self, response: SipResponse, addr: Address) -> None:
        transaction = self._client_transactions.get(response.via.branch or "")
        if transaction is None or response.cseq.method != transaction.method:
            self.counts["stray_response"] += 1
            return
        transaction.receive(response)

    def _on_ack(self, ack: SipRequest) -> None:
        dialog = self._dialogs.get(ack.call_id)
        if dialog is None or not dialog.matches(ack) or not dialog.acked(ack):
            self.counts["stray_ack"] += 1  # a late duplicate, or for a call already over
            return
        if dialog.confirm():
            self._spawn(self.handler.start(dialog), f"start() for call {dialog.call_id}")

    def _on_request(self, tx: ServerTransaction, addr: Address) -> None:
        request = tx.request
        method = request.method
        uri = request.sip_uri if ":" in request.uri and request.uri.lower().startswith("sip:") else None
        if uri is None:
            self.respond(tx, 416, "Unsupported URI Scheme")
            return
        dialog = self._dialogs.get(request.call_id)
        in_dialog = request.to.tag is not None
        if in_dialog and method != "CANCEL" and (dialog is None or not dialog.matches(request)):
            self.respond(tx, 481)
            return
        if method == "INVITE":
            if in_dialog:
                self._on_reinvite(tx, dialog)
            else:
                self._on_invite(tx, addr)
        elif method == "CANCEL":
            self._on_cancel(tx)
        elif method == "BYE":
            if dialog is None:
                self.respond(tx, 481)
                return
            self.respond(tx, 200)
            self._spawn(dialog.end("bye"), f"BYE for call {dialog.call_id}")
        elif method == "OPTIONS":
            # A dispatcher's keep-alive probe (Kamailio): 503 while a new call would be refused takes
            # this server out of its rotation until the probe is answered 200 again.
            not_ready = self.not_ready_reason()
            if not_ready is not None:
                self.respond(tx, 503, _phrase("Service Unavailable", not_ready), refusal="")  # a probe, not a call
            else:
                self.respond(tx, 200, headers=[("Allow", ALLOW), ("Accept", SDP)])
        elif method in ("INFO", "NOTIFY"):
            # INFO carries application/dtmf-relay; NOTIFY reports on a REFER we sent. Both only in a dialog.
            self.respond(tx, 200 if in_dialog else 481)
        elif method in NOT_ALLOWED:
            self.respond(tx, 405, headers=[("Allow", ALLOW)])
        else:
            self.respond(tx, 501, f"Not Implemented ({method})")

    # INVITE ------------------------------------------------------------------------------------

    def _on_invite(self, tx: ServerTransaction, addr: Address) -> None:
        request = tx.request
        existing = self._dialogs.get(request.call_id)
        if existing is not None:
            if existing.remote_tag == request.from_.tag and existing.invite.cseq == request.cseq:
                # A retransmission after our 2xx ended the transaction: re-send the 2xx (§13.3.1.4).
                existing.resend_ok()
                tx.close()
            else:
                self.respond(tx, 482, "Loop Detected")
            return
        if self.auth is not None and self.auth.verify(request) is None:
            response = self.auth.challenge(request)
            response.headers.add("Server", self.user_agent)
            tx.respond(response)
            return
        if self._stopping or self._draining:
            # 503, not 486: this server is going away, and a proxy tries the next one (RFC 3261 §21.5.4).
            kind = "shutting_down" if self._stopping else "draining"
            self.respond(tx, 503, _phrase("Service Unavailable", kind.replace("_", " ")),
                         headers=[("Retry-After", "30")], refusal=kind)
            return
        if (busy := self.not_ready_reason()) is not None:
            self._note("busy", addr, f"call from {addr[0]} refused: {busy}")
            self.respond(tx, 486, _phrase("Busy Here", busy))
            return
        if not request.contacts:
            self.respond(tx, 400, _bad_request("INVITE has no Contact"))
            return
        if not self._acceptable_body(tx, initial=True):
            return
        local = LocalEnd(self._advertised_host(addr), self.port, self.user_agent)
        dialog = Dialog(self, self.handler, tx, new_tag(), local, t1=self.t1, t2=self.t2)
        self._add(dialog)
        self.respond(tx, 100)
        self.respond(tx, 180, to_tag=dialog.local_tag, headers=[("Contact", dialog.local_contact)])
        self._spawn(dialog.answer(tx, request), f"offer() for call {dialog.call_id}")

    def _on_reinvite(self, tx: ServerTransaction, dialog: Dialog) -> None:
        request = tx.request
        if not dialog.answered:
            # §14.2: the first INVITE is still unanswered.
            self.respond(
                tx,
                500,
                "Server Internal Error (the first INVITE is still unanswered)",
                headers=[("Retry-After", "1")],
            )
            return
        if dialog.offer_pending:
            self.respond(tx, 491)  # §14.2: an offer of ours or theirs is still outstanding
            return
        if not dialog.take_cseq(request):
            self.respond(tx, 500, "Server Internal Error (CSeq out of order)")
            return
        if not request.body:
            dialog.refresh(tx)
            return
        if not self._acceptable_body(tx, initial=False):
            return
        dialog.begin_reinvite(request)
        self.respond(tx, 100)
        self._spawn(dialog.answer(tx, request), f"re-INVITE offer() for call {dialog.call_id}")

    def _acceptable_body(self, tx: ServerTransaction, *, initial: bool) -> bool:
        request = tx.request
        content_type = (request.header("Content-Type") or "").split(";")[0].strip().lower()
        encoding = (request.header("Content-Encoding") or "identity").strip().lower()
        if not request.body:
            # Offer-less INVITE: the handler answers offers, it cannot make one.
            self.respond(tx, 488, "Not Acceptable Here (no SDP offer in the INVITE)", refusal="no_sdp")
        elif content_type != SDP or encoding != "identity":
            self.respond(tx, 415, headers=[("Accept", SDP), ("Accept-Encoding", "identity")])
        elif request.headers.get("Require"):
            tags = request.headers_all("Require")
            self.respond(tx, 420, "Bad Extension", headers=[("Unsupported", t) for t in tags])
        else:
            return True
        return False

    # CANCEL ------------------------------------------------------------------------------------

    def _on_cancel(self, tx: ServerTransaction) -> None:
        invite_tx = self.transactions.matching_invite(tx.request)
        if invite_tx is None:
            self.respond(tx, 481)
            return
        dialog = self._dialogs.get(tx.request.call_id)
        to_tag = dialog.local_tag if dialog is not None else None
        self.respond(tx, 200, to_tag=to_tag)
        final_sent = invite_tx.last_response is not None and invite_tx.last_response.status >= 200
        if final_sent:
            return  # §9.2: too late, the CANCEL has no effect
        if dialog is not None and dialog.invite_tx is invite_tx:
            self._spawn(dialog.end("cancel"), f"CANCEL for call {dialog.call_id}")
        else:
            self.respond(invite_tx, 487, to_tag=to_tag)  # a re-INVITE still being answered

    # Helpers -----------------------------------------------------------------------------------

    def _advertised_host(self, peer: Address) -> str:
        """The address for our Contact and Via: the public address, the bound one, or (bound to a
        wildcard) the local address the kernel would use to reach the peer."""
        if self.public_address:
            return self.public_address
        try:
            if not ipaddress.ip_address(self.host).is_unspecified:
                return self.host
        except ValueError:
            return self.host
        family = socket.AF_INET6 if ":" in peer[0] else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect(peer[:2])  # UDP connect sends nothing; it only picks a route
                return probe.getsockname()[0]
        except OSError:
            return self.host

    def _spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(task: asyncio.Task) -> None:
            self._tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                logger.opt(exception=task.exception()).error("SIP task failed: {}", what)

        task.add_done_callback(done)
        return task

    def _note(self, kind: str, addr: Address, message: str) -> None:
        """Count a problem and log it the first time this source shows it."""
        self.counts[kind] += 1
        key = (addr[0], kind)
        if key not in self._logged and len(self._logged) < _LOGGED_LIMIT:
            self._logged.add(key)
            logger.warning("{} (further ones from {} are counted, not logged)", message, addr[0])


def _bad_request(problem: str) -> str:
    """A 400 reason phrase naming the problem, kept to one short printable line."""
    return _phrase("Bad Request", problem)


def _phrase(status_text: str, problem: str) -> str:
    """A reason phrase naming the problem, kept to one short printable line."""
    problem = re.sub(r"[^\x20-\x7e]", "?", problem)
    return f"{status_text} ({problem[:120]})"


def _salvage_request(data: bytes) -> SipRequest | None:
    """From a request that failed to parse, the start line and the headers a response needs, if
    they are there and sound: then the sender can be told what was wrong with a 400."""
    head = re.split(rb"\r?\n\r?\n", data.lstrip(b"\r\n"), maxsplit=1)[0].decode("utf-8", "replace")
    lines = re.split(r"\r?\n", head)
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] != SIP_VERSION or not _TOKEN.fullmatch(parts[0]):
        return None
    request = SipRequest(parts[0], parts[1])
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        name = canonical_name(name.strip())
        if colon and name in ("Via", "From", "To", "Call-ID", "CSeq"):
            for part in _split_commas(value.strip()) if name == "Via" else [value.strip()]:
                request.headers.add(name, part)
    try:
        _ = request.via, request.from_, request.to, request.call_id
        CSeq.parse(request.headers.get("CSeq") or "")
        Via.parse(request.headers.get("Via") or "")
    except SipParseError:
        return None
    return request
