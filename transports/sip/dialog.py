"""One call's SIP dialog on the server side (RFC 3261 §12, §13.3, §15): its identifiers and route, the
2xx retransmission until the ACK, and the requests we send inside it (BYE, REFER).

A `Dialog` is made by `SipServer` when an INVITE is accepted for processing; the server routes the
dialog's later requests and the responses to its own requests here.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from loguru import logger

from .message import SipRequest, SipResponse, new_branch
from .sdp import SdpError
from .transaction import Address, ServerTransaction
from .values import SipParseError, SipUri

if TYPE_CHECKING:
    from .server import SipServer

MAX_FORWARDS = "70"
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, NOTIFY"
SDP = "application/sdp"


class CallRejected(Exception):
    """Raised by `SipCallHandler.offer` to refuse a call or re-INVITE with `status` (e.g. 488, 503)."""

    def __init__(self, status: int, reason: str | None = None):
        super().__init__(f"{status} {reason or ''}".strip())
        self.status = status
        self.reason = reason


class ClientTransaction:
    """A non-INVITE client transaction over UDP (§17.1.2): Timer E retransmits, starting at T1 and
    doubling to T2 (every T2 once a provisional response came), Timer F gives up after 64*T1."""

    def __init__(
        self,
        send: Callable[[bytes, Address], None],
        request: SipRequest,
        destination: Address,
        t1: float,
        t2: float,
    ):
        self.request = request
        self.branch = request.via.branch or ""
        self.method = request.method
        self._send = send
        self._data = bytes(request)
        self._destination = destination
        self._t1, self._t2 = t1, t2
        self._interval = t1
        self._proceeding = False
        loop = asyncio.get_running_loop()
        self.result: asyncio.Future[SipResponse | None] = loop.create_future()
        self._timer_e: asyncio.TimerHandle | None = None
        self._timer_f = loop.call_later(64 * t1, self._finish, None)

    def start(self) -> None:
        self._transmit()

    def receive(self, response: SipResponse) -> None:
        if self.result.done():
            return
        if response.status < 200:
            self._proceeding = True
            return
        self._finish(response)

    def cancel(self) -> None:
        self._finish(None)

    def _transmit(self) -> None:
        self._send(self._data, self._destination)
        interval = self._t2 if self._proceeding else self._interval
        self._interval = min(2 * self._interval, self._t2)
        self._timer_e = asyncio.get_running_loop().call_later(interval, self._transmit)

    def _finish(self, response: SipResponse | None) -> None:
        if self._timer_e is not None:
            self._timer_e.cancel()
        self._timer_f.cancel()
        if not self.result.done():
            self.result.set_result(response)


class Dialog:
    """The server side of one call. `confirmed` turns True when the ACK for our 2xx arrives."""

    def __init__(
        self, server: SipServer, invite: SipRequest, remote_addr: Address, local_tag: str, local_host: str
    ):
        self.server = server
        self.invite = invite
        self.call_id = invite.call_id
        self.local_tag = local_tag
        self.remote_tag = invite.from_.tag or ""
        contact = invite.contact_uri
        self.remote_uri = str(contact) if contact is not None else str(invite.from_.uri)
        self.remote_addr = remote_addr
        self.local_host = local_host
        # The INVITE's Record-Route, in order, is our route set (§12.1.1). Our requests still go to
        # the INVITE's source address: a trunk behind NAT often puts an unreachable host in Contact.
        self.route_set = invite.headers_all("Record-Route")
        self.confirmed = False
        self.ended = False
        self.cancelled = False
        self.offer_succeeded = False
        self.end_notified = False
        self.end_reason = ""
        # The initial INVITE's server transaction, while it awaits its final response (for CANCEL).
        self.invite_tx: ServerTransaction | None = None
        self.local_sdp: bytes = b""
        self.remote_cseq = invite.cseq.number
        self._local_cseq = itertools.count(1)
        # The INVITE (initial or re-INVITE) whose 2xx is being retransmitted, and that 2xx.
        self.pending_invite: SipRequest | None = None
        self.ok_bytes: bytes | None = None
        self.reinvite_pending = False
        self._ok_timer: asyncio.TimerHandle | None = None
        self._ok_deadline = 0.0
        self._ok_interval = 0.0

    def __repr__(self) -> str:
        state = "ended" if self.ended else "confirmed" if self.confirmed else "early"
        return f"Dialog({self.call_id}, {state}, from {self.remote_addr[0]}:{self.remote_addr[1]})"

    # What we send and to whom -----------------------------------------------------------------

    @property
    def local_contact(self) -> str:
        host = f"[{self.local_host}]" if ":" in self.local_host else self.local_host
        return f"<sip:{host}:{self.server.port}>"

    def matches(self, request: SipRequest) -> bool:
        """Whether an in-dialog request carries this dialog's tags (theirs in From, ours in To)."""
        try:
            return request.from_.tag == self.remote_tag and request.to.tag == self.local_tag
        except SipParseError:
            return False

    def new_request(
        self, method: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b""
    ) -> SipRequest:
        """A request inside this dialog (§12.2.1.1): our From/To are the INVITE's To/From swapped."""
        host = f"[{self.local_host}]" if ":" in self.local_host else self.local_host
        local = self.invite.to
        local.params["tag"] = self.local_tag
        request = SipRequest(method, self.remote_uri)
        add = request.headers.add
        add("Via", f"SIP/2.0/UDP {host}:{self.server.port};branch={new_branch()};rport")
        add("Max-Forwards", MAX_FORWARDS)
        add("From", str(local))
        add("To", self.invite.header("From") or "")
        add("Call-ID", self.call_id)
        add("CSeq", f"{next(self._local_cseq)} {method}")
        for route in self.route_set:
            add("Route", route)
        add("Contact", self.local_contact)
        add("User-Agent", self.server.user_agent)
        for name, value in headers:
            add(name, value)
        request.body = body
        return request

    async def send_request(self, request: SipRequest) -> SipResponse | None:
        """Send `request` in a client transaction; its final response, or None after Timer F."""
        return await self.server.start_request(request, self.remote_addr).result

    # Answering an offer (§13.3.1) -------------------------------------------------------------

    async def answer(self, tx: ServerTransaction, request: SipRequest) -> None:
        """Ask the handler for the answer to `request`'s SDP (initial INVITE or re-INVITE) and send
        the 2xx, or the final response the handler's refusal or failure calls for."""
        server = self.server
        initial = not self.confirmed and request is self.invite
        status, reason = 0, None
        try:
            answer = await server.handler.offer(self, request.body)
            if not isinstance(answer, bytes | str):
                raise TypeError(f"offer() returned {type(answer).__name__}, expected SDP bytes")
        except CallRejected as exc:
            status, reason = exc.status, exc.reason
        except SdpError as exc:
            # The reason names what was wrong (a port out of range, a host name for an address) so
            # the caller's side can tell; no RTP has been sent.
            status, reason = 488, _not_acceptable(str(exc))
            logger.info("SDP offer on call {} not acceptable: {}", self.call_id, exc)
        except Exception:
            status = 500
            logger.exception("call handler failed in offer() for call {}", self.call_id)
        finally:
            if not initial:
                self.reinvite_pending = False
        if status:
            if initial and not self.ended:
                self.close()
                server.dialogs.pop(self.call_id, None)
            if not initial or tx.last_response is None or tx.last_response.status < 200:
                server.respond(tx, status, reason, to_tag=self.local_tag)
            return
        if initial:
            self.offer_succeeded = True
        if self.ended:
            # CANCEL, BYE, hang_up or stop() came while the handler worked; the INVITE is answered.
            if initial:
                await server.notify_end(self, self.end_reason)
            else:
                server.respond(tx, 487)
            return
        self.local_sdp = answer.encode() if isinstance(answer, str) else answer
        self.send_ok(request, self.ok(request, self.local_sdp))
        tx.close()

    def ok(self, request: SipRequest, sdp: bytes) -> SipResponse:
        """Our 200 to an INVITE of this dialog (§12.1.1: Record-Route copied, our Contact)."""
        headers = [(name, value) for name, value in request.headers if name == "Record-Route"]
        headers += [
            ("Contact", self.local_contact),
            ("Allow", ALLOW),
            ("Accept", SDP),
            ("Server", self.server.user_agent),
            ("Content-Type", SDP),
        ]
        return request.response(200, to_tag=self.local_tag, headers=headers, body=sdp)

    # 2xx retransmission (§13.3.1.4) -----------------------------------------------------------

    def send_ok(self, invite: SipRequest, ok: SipResponse) -> None:
        """Send our 2xx to `invite` and keep sending it, T1 doubling to T2, until its ACK or 64*T1."""
        self._stop_ok()
        self.pending_invite = invite
        self.ok_bytes = bytes(ok)
        loop = asyncio.get_running_loop()
        self._ok_deadline = loop.time() + 64 * self.server.t1
        self._ok_interval = self.server.t1
        self.server.send(self.ok_bytes, self.server.response_destination(invite, self.remote_addr))
        self._ok_timer = loop.call_later(self._ok_interval, self._resend_ok)

    def resend_ok(self) -> None:
        """A retransmitted INVITE after our 2xx: send the 2xx again (its transaction has ended)."""
        if self.ok_bytes is not None and self.pending_invite is not None:
            self.server.send(
                self.ok_bytes, self.server.response_destination(self.pending_invite, self.remote_addr)
            )

    def acked(self, ack: SipRequest) -> bool:
        """Whether `ack` acknowledges the 2xx being retransmitted; stops the retransmission if so."""
        if self.pending_invite is None or ack.cseq.number != self.pending_invite.cseq.number:
            return False
        self._stop_ok()
        self.pending_invite = None
        return True

    def _resend_ok(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() >= self._ok_deadline:
            self._ok_timer = None
            self.server.on_no_ack(self)
            return
        self.resend_ok()
        self._ok_interval = min(2 * self._ok_interval, self.server.t2)
        self._ok_timer = loop.call_later(self._ok_interval, self._resend_ok)

    def _stop_ok(self) -> None:
        if self._ok_timer is not None:
            self._ok_timer.cancel()
            self._ok_timer = None

    # Ending the call and transferring it -------------------------------------------------------

    async def hang_up(self) -> None:
        """We end the call: BYE (retransmitted until answered or Timer F), then `end(self, 'hangup')`.

        Before our 2xx the INVITE is answered 480 instead. Between the 2xx and its ACK the BYE goes at
        once rather than after the ACK as §15 asks: the agent has decided, and the caller copes.
        """
        await self.server.terminate(self, "hangup", send_bye=True)

    def start_bye(self) -> ClientTransaction:
        """Send BYE now (and keep retransmitting it); await `.result` for the answer."""
        self._stop_ok()
        return self.server.start_request(self.new_request("BYE"), self.remote_addr)

    async def refer(self, target: str) -> bool:
        """Blind transfer (RFC 3515): ask the caller to call `target`; True when the REFER got a 2xx.

        The NOTIFYs that report the new call's progress are answered 200 and otherwise ignored.
        """
        if self.ended or not self.confirmed:
            logger.warning("REFER on call {} skipped: the dialog is not confirmed", self.call_id)
            return False
        request = self.new_request("REFER", [("Refer-To", self.refer_to(target)), ("Referred-By", self.local_contact)])
        response = await self.send_request(request)
        if response is None:
            logger.warning("REFER to {} on call {} got no answer", target, self.call_id)
            return False
        if response.status >= 300:
            logger.info(
                "REFER to {} on call {} refused: {} {}",
                target,
                self.call_id,
                response.status,
                response.reason,
            )
        return 200 <= response.status < 300

    def refer_to(self, target: str) -> str:
        """The Refer-To value for `target`: a SIP URI as given, or an E.164 number (`+15550100200`)
        as a phone number at the caller's domain, which is where a trunk routes its own numbers."""
        if target.startswith("+"):
            try:
                domain = SipUri.parse(self.invite.from_.uri).host
            except SipParseError:  # a tel: From has no domain; the trunk's address stands in
                domain = self.remote_addr[0]
            target = f"sip:{target}@{domain};user=phone"
        return target if target.startswith("<") else f"<{target}>"

    def close(self) -> None:
        """Stop the timers; the server has removed the dialog."""
        self.ended = True
        self._stop_ok()


def _not_acceptable(problem: str) -> str:
    problem = "".join(c if " " <= c <= "~" else "?" for c in problem)
    return f"Not Acceptable Here ({problem[:120]})"
