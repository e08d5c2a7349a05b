"""One call's SIP dialog on the server side (RFC 3261 §12, §13.3, §15): its identifiers and route, the
2xx retransmission until the ACK, the requests we send inside it (BYE, REFER) and its end.

A `Dialog` talks to two things only: its `DialogHost` (the `SipServer`: the socket, the client
transactions, the table of dialogs), through the five operations of that Protocol, and its
`SipCallHandler` (the application: the SDP answer, the call's start and end). The server routes the
dialog's later requests here and changes the dialog's state only through its methods.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from loguru import logger

from .message import SipRequest, SipResponse, new_branch
from .sdp import SdpError
from .transaction import T1, T2, Address, ClientTransaction, ServerTransaction, response_address
from .values import SipParseError, SipUri

MAX_FORWARDS = "70"
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, NOTIFY"
SDP = "application/sdp"
# Status for an INVITE still unanswered when its dialog ends, by why it ended.
_UNANSWERED_STATUS = {"cancel": 487, "bye": 487, "shutdown": 503, "hangup": 480}


class CallRejected(Exception):
    """Raised by `SipCallHandler.offer` to refuse a call or re-INVITE with `status` (e.g. 488, 503)."""

    def __init__(self, status: int, reason: str | None = None):
        super().__init__(f"{status} {reason or ''}".strip())
        self.status = status
        self.reason = reason


class SipCallHandler(Protocol):
    async def offer(self, dialog: Dialog, sdp: bytes) -> bytes:
        """Initial INVITE (dialog.confirmed is False) or re-INVITE (True): return our SDP answer,
        or raise CallRejected (sdp.SdpError may also be raised: answer 488)."""

    async def start(self, dialog: Dialog) -> None:
        """The ACK for our 2xx to the initial INVITE arrived: the call runs (return quickly)."""

    async def end(self, dialog: Dialog, reason: str) -> None:
        """The dialog is over: 'bye', 'cancel', 'no_ack', 'hangup' or 'shutdown'. Called exactly once
        for every dialog whose offer() succeeded."""


class DialogHost(Protocol):
    """What a dialog needs of whatever carries its messages and holds it in a table (`SipServer`)."""

    def send(self, data: bytes, addr: Address) -> None:
        """Send one datagram: our 2xx to an INVITE and its retransmissions."""

    def start_request(self, request: SipRequest, addr: Address) -> ClientTransaction:
        """Send `request` in a started client transaction that the responses to it reach."""

    def respond(
        self,
        tx: ServerTransaction,
        status: int,
        reason: str | None = None,
        *,
        to_tag: str | None = None,
        refusal: str | None = None,
    ) -> None:
        """Answer a request (the host adds its Server header and counts refusals; see SipServer)."""

    def on_no_ack(self, dialog: Dialog) -> None:
        """No ACK came for our 2xx within 64*T1: the host counts it and has the dialog end itself."""

    def forget(self, dialog: Dialog) -> None:
        """The dialog is over: drop it from the table, so later requests for it are answered 481."""


@dataclass(frozen=True)
class LocalEnd:
    """Our side of a dialog as the far end sees it: the address of our Via and Contact, and the product
    named in User-Agent and Server."""

    host: str
    port: int
    user_agent: str

    @property
    def hostport(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class Dialog:
    """The server side of one call, from the INVITE's server transaction `invite_tx` until `end`.
    `confirmed` turns True when the ACK for our 2xx arrives, `ended` once the dialog is over."""

    def __init__(
        self,
        host: DialogHost,
        handler: SipCallHandler,
        invite_tx: ServerTransaction,
        local_tag: str,
        local: LocalEnd,
        *,
        t1: float = T1,
        t2: float = T2,
    ):
        self.host = host
        self.handler = handler
        # The initial INVITE's server transaction: a CANCEL names it, and an end before our 2xx answers it.
        self.invite_tx = invite_tx
        self.invite = invite = invite_tx.request
        self.call_id = invite.call_id
        self.local_tag = local_tag
        self.remote_tag = invite.from_.tag or ""
        contact = invite.contact_uri
        self.remote_uri = str(contact) if contact is not None else str(invite.from_.uri)
        self.remote_addr = invite_tx.addr
        self.local = local
        self.t1, self.t2 = t1, t2
        # The INVITE's Record-Route, in order, is our route set (§12.1.1). Our requests still go to
        # the INVITE's source address: a trunk behind NAT often puts an unreachable host in Contact.
        self.route_set = invite.headers_all("Record-Route")
        self.end_reason = ""
        self.local_sdp: bytes = b""
        self.remote_cseq = invite.cseq.number
        self._local_cseq = itertools.count(1)
        self._confirmed = False
        self._ended = False
        self._offer_succeeded = False  # the handler owes an end() only for these
        self._end_notified = False
        self._reinvite_pending = False  # a re-INVITE's offer is with the handler
        # The INVITE (initial or re-INVITE) whose 2xx is being retransmitted, and our latest 2xx.
        self._pending_invite: SipRequest | None = None
        self._ok_bytes: bytes | None = None
        self._ok_timer: asyncio.TimerHandle | None = None
        self._ok_deadline = 0.0
        self._ok_interval = 0.0

    def __repr__(self) -> str:
        state = "ended" if self._ended else "confirmed" if self._confirmed else "early"
        return f"Dialog({self.call_id}, {state}, from {self.remote_addr[0]}:{self.remote_addr[1]})"

    # State ---------------------------------------------------------------------------------------

    @property
    def confirmed(self) -> bool:
        return self._confirmed

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def answered(self) -> bool:
        """Whether we have sent a 2xx to the initial INVITE (a BYE then ends the call, not a 4xx/5xx)."""
        return self._ok_bytes is not None

    @property
    def offer_pending(self) -> bool:
        """An offer is outstanding (§14.2): a re-INVITE with the handler, or a 2xx of ours not yet ACKed."""
        return self._reinvite_pending or self._pending_invite is not None

    def confirm(self) -> bool:
        """The ACK for our 2xx came: True the first time, when the call starts."""
        if self._confirmed:
            return False
        self._confirmed = True
        return True

    # What we send and to whom -----------------------------------------------------------------

    @property
    def local_contact(self) -> str:
        return f"<sip:{self.local.hostport}>"

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
        local = self.invite.to
        local.params["tag"] = self.local_tag
        request = SipRequest(method, self.remote_uri)
        add = request.headers.add
        add("Via", f"SIP/2.0/UDP {self.local.hostport};branch={new_branch()};rport")
        add("Max-Forwards", MAX_FORWARDS)
        add("From", str(local))
        add("To", self.invite.header("From") or "")
        add("Call-ID", self.call_id)
        add("CSeq", f"{next(self._local_cseq)} {method}")
        for route in self.route_set:
            add("Route", route)
        add("Contact", self.local_contact)
        add("User-Agent", self.local.user_agent)
        for name, value in headers:
            add(name, value)
        request.body = body
        return request

    async def send_request(self, request: SipRequest) -> SipResponse | None:
        """Send `request` in a client transaction; its final response, or None after Timer F."""
        return await self.host.start_request(request, self.remote_addr).result

    # Answering an offer (§13.3.1) -------------------------------------------------------------

    async def answer(self, tx: ServerTransaction, request: SipRequest) -> None:
        """Ask the handler for the answer to `request`'s SDP (initial INVITE or re-INVITE) and send
        the 2xx, or the final response the handler's refusal or failure calls for."""
        initial = not self._confirmed and request is self.invite
        status, reason = 0, None
        try:
            answer = await self.handler.offer(self, request.body)
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
                self._reinvite_pending = False
        if status:
            if initial and not self._ended:
                self._finish()
            if not initial or tx.last_response is None or tx.last_response.status < 200:
                self.host.respond(tx, status, reason, to_tag=self.local_tag)
            return
        if initial:
            self._offer_succeeded = True
        if self._ended:
            # CANCEL, BYE, hang_up or stop() came while the handler worked; the INVITE is answered.
            if initial:
                await self._notify_end(self.end_reason)
            else:
                self.host.respond(tx, 487)
            return
        self.local_sdp = answer.encode() if isinstance(answer, str) else answer
        self.send_ok(request, self.ok(request, self.local_sdp))
        tx.close()

    def take_cseq(self, request: SipRequest) -> bool:
        """Whether a re-INVITE's CSeq is above the last one (§12.2.2); if so it becomes the last one."""
        if request.cseq.number <= self.remote_cseq:
            return False
        self.remote_cseq = request.cseq.number
        return True

    def refresh(self, tx: ServerTransaction) -> None:
        """A re-INVITE without SDP (a session refresh): our current SDP goes as the offer in the 2xx;
        the answer in the ACK is ignored."""
        self.send_ok(tx.request, self.ok(tx.request, self.local_sdp))
        tx.close()

    def begin_reinvite(self, request: SipRequest) -> None:
        """A re-INVITE with an offer goes to the handler (`answer`): until it returns, another gets 491."""
        if (contact := request.contact_uri) is not None:
            self.remote_uri = str(contact)  # §12.2.2: a target refresh
        self._reinvite_pending = True

    def ok(self, request: SipRequest, sdp: bytes) -> SipResponse:
        """Our 200 to an INVITE of this dialog (§12.1.1: Record-Route copied, our Contact)."""
        headers = [(name, value) for name, value in request.headers if name == "Record-Route"]
        headers += [
            ("Contact", self.local_contact),
            ("Allow", ALLOW),
            ("Accept", SDP),
            ("Server", self.local.user_agent),
            ("Content-Type", SDP),
        ]
        return request.response(200, to_tag=self.local_tag, headers=headers, body=sdp)

    # 2xx retransmission (§13.3.1.4) -----------------------------------------------------------

    def send_ok(self, invite: SipRequest, ok: SipResponse) -> None:
        """Send our 2xx to `invite` and keep sending it, T1 doubling to T2, until its ACK or 64*T1."""
        self._stop_ok()
        self._pending_invite = invite
        self._ok_bytes = bytes(ok)
        loop = asyncio.get_running_loop()
        self._ok_deadline = loop.time() + 64 * self.t1
        self._ok_interval = self.t1
        self.resend_ok()
        self._ok_timer = loop.call_later(self._ok_interval, self._resend_ok)

    def resend_ok(self) -> None:
        """A retransmitted INVITE after our 2xx: send the 2xx again (its transaction has ended)."""
        if self._ok_bytes is not None and self._pending_invite is not None:
            self.host.send(self._ok_bytes, response_address(self._pending_invite, self.remote_addr))

    def acked(self, ack: SipRequest) -> bool:
        """Whether `ack` acknowledges the 2xx being retransmitted; stops the retransmission if so."""
        if self._pending_invite is None or ack.cseq.number != self._pending_invite.cseq.number:
            return False
        self._stop_ok()
        self._pending_invite = None
        return True

    def _resend_ok(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() >= self._ok_deadline:
            self._ok_timer = None
            self.host.on_no_ack(self)
            return
        self.resend_ok()
        self._ok_interval = min(2 * self._ok_interval, self.t2)
        self._ok_timer = loop.call_later(self._ok_interval, self._resend_ok)

    def _stop_ok(self) -> None:
        if self._ok_timer is not None:
            self._ok_timer.cancel()
            self._ok_timer = None

    # Ending the call and transferring it -------------------------------------------------------

    async def hang_up(self) -> None:
        """We end the call: BYE (retransmitted until answered or Timer F), then the handler's end().

        Before our 2xx the INVITE is answered 480 instead. Between the 2xx and its ACK the BYE goes at
        once rather than after the ACK as §15 asks: the agent has decided, and the caller copes.
        """
        await self.end("hangup", send_bye=True)

    async def end(self, reason: str, *, send_bye: bool = False) -> None:
        """End the dialog once: the host forgets it at once, an unanswered INVITE gets its final
        response, an answered call its BYE (if `send_bye`), and the handler hears end(self, reason)
        (for an offer still running: when it returns). Returns once the BYE is answered or given up."""
        if self._ended:
            return
        self.end_reason = reason
        self._finish()
        bye = None
        if send_bye and self.answered:
            bye = self.host.start_request(self.new_request("BYE"), self.remote_addr)
        if not self.answered:
            status = _UNANSWERED_STATUS.get(reason, 480)
            refusal = reason if status == 503 else None
            self.host.respond(self.invite_tx, status, to_tag=self.local_tag, refusal=refusal)
        await self._notify_end(reason)
        if bye is not None:
            await bye.result

    async def refer(self, target: str) -> bool:
        """Blind transfer (RFC 3515): ask the caller to call `target`; True when the REFER got a 2xx.

        The NOTIFYs that report the new call's progress are answered 200 and otherwise ignored.
        """
        if self._ended or not self._confirmed:
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

    def _finish(self) -> None:
        """Over: no more 2xx retransmissions, and out of the host's table."""
        self._ended = True
        self._stop_ok()
        self.host.forget(self)

    async def _notify_end(self, reason: str) -> None:
        if not self._offer_succeeded or self._end_notified:
            return
        self._end_notified = True
        try:
            await self.handler.end(self, reason)
        except Exception:
            logger.exception("call handler failed in end() for call {}", self.call_id)


def _not_acceptable(problem: str) -> str:
    problem = "".join(c if " " <= c <= "~" else "?" for c in problem)
    return f"Not Acceptable Here ({problem[:120]})"
