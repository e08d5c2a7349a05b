"""One outbound SIP call, the calling side (UAC, RFC 3261 §13, §17.1): INVITE with an SDP offer,
provisional responses, digest authentication, CANCEL when nobody answers in time, ACK, and the
dialog's requests until BYE.

    dialog = SipOutboundCall(SipUri.parse("sip:alice@10.0.0.7:5060"), local_host="10.0.0.2")
    await dialog.open()
    answer_sdp = await dialog.dial(offer_sdp("10.0.0.2", rtp_port, ("PCMU",)), ring_timeout=30)
    ...                                   # media runs; dialog.ended is set when the callee sends BYE
    await dialog.hang_up()                # BYE (unless the callee hung up), then the socket closes

Each call has its own UDP socket; its Contact points there, so the callee's in-dialog requests
(BYE, re-INVITE) come back to it. Early media (183 with SDP) is ignored: nothing plays before the
answer. `dial` raises `DialFailed` with the outcome a person would name: busy, no-answer or failed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import random
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger

from .auth import digest_response, parse_digest_credentials
from .message import SipMessage, SipRequest, SipResponse, new_branch, new_tag
from .transaction import SIP_DEFAULT_PORT, T1, T2
from .values import NameAddr, SipParseError, SipUri

DTMF_PAYLOAD_TYPE = 101
STATIC_PAYLOAD_TYPES = {"PCMU": 0, "PCMA": 8}
TIMER_B = 64 * T1  # no response at all to the INVITE for this long: the far end is not there (§17.1.1.2)
CANCEL_WAIT_SECS = 4.0  # after CANCEL, how long the 487 may take before we stop waiting
BYE_WAIT_SECS = 4.0
MAX_AUTH_TRIES = 2

BUSY = frozenset({486, 600, 603})
NO_ANSWER = frozenset({408, 480, 487})


class DialFailed(RuntimeError):
    """The call was not answered. `outcome`: busy, no-answer or failed; `status`: the final SIP status
    (None when none came)."""

    def __init__(self, outcome: str, status: int | None, reason: str):
        super().__init__(f"{outcome}: {status or 'no response'} {reason}".strip())
        self.outcome = outcome
        self.status = status
        self.reason = reason


def outcome_for(status: int) -> str:
    if status in BUSY:
        return "busy"
    if status in NO_ANSWER:
        return "no-answer"
    return "failed"


@dataclass(frozen=True)
class Credentials:
    """What to answer a 401/407 challenge with; `realm`: answer only this realm's challenges."""

    username: str
    password: str
    realm: str | None = None


def offer_sdp(
    local_ip: str, port: int, codecs: tuple[str, ...] | list[str], session_id: int | None = None
) -> bytes:
    """Our SDP offer: one G.711 audio stream in `codecs`' order, plus RFC 4733 telephone-event."""
    types = [STATIC_PAYLOAD_TYPES[name.upper()] for name in codecs]
    session_id = session_id if session_id is not None else random.randrange(1 << 31)
    family = "IP6" if ":" in local_ip else "IP4"
    lines = [
        "v=0",
        f"o=- {session_id} {session_id} IN {family} {local_ip}",
        "s=-",
        f"c=IN {family} {local_ip}",
        "t=0 0",
        f"m=audio {port} RTP/AVP {' '.join(map(str, types))} {DTMF_PAYLOAD_TYPE}",
        *(f"a=rtpmap:{pt} {name.upper()}/8000" for pt, name in zip(types, codecs, strict=True)),
        f"a=rtpmap:{DTMF_PAYLOAD_TYPE} telephone-event/8000",
        f"a=fmtp:{DTMF_PAYLOAD_TYPE} 0-16",
        "a=ptime:20",
        "a=sendrecv",
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


class _Socket(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, tuple], None]):
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            self.on_datagram(data, addr)
        except Exception:  # one bad datagram must not end the call
            logger.exception("SIP outbound: datagram handling failed")


class SipOutboundCall:
    """The dialog of one call we place. `target`: the Request-URI; `next_hop`: where requests go
    (default: the target's host and port); `from_user`: the user part of From (a caller id)."""

    def __init__(
        self,
        target: SipUri,
        *,
        local_host: str = "127.0.0.1",
        contact_host: str | None = None,
        next_hop: tuple[str, int] | None = None,
        from_user: str = "agent",
        from_host: str | None = None,
        credentials: Credentials | None = None,
        on_progress: Callable[[int, str], None] | None = None,
    ):
        self.target = target
        self.local_host = local_host
        self.contact_host = contact_host or local_host
        self.next_hop = next_hop or (target.host, target.port or SIP_DEFAULT_PORT)
        self.from_user = from_user
        self.from_host = from_host
        self.credentials = credentials
        self.on_progress = on_progress
        self.call_id = f"{secrets.token_hex(10)}@{self.contact_host}"
        self.from_tag = new_tag()
        self.to_header = f"<{target}>"
        self.ended = asyncio.Event()  # the callee hung up (BYE)
        self.answered = False
        self.statuses: list[int] = []  # every response status to our INVITEs, in order: for logs and tests
        self._cseq = itertools.count(1)
        self._sip: asyncio.DatagramTransport | None = None
        self._hop: tuple[str, int] | None = None
        self._waiting: dict[tuple[int, str], asyncio.Queue[SipResponse]] = {}
        self._remote_target: str | None = None
        self._route: list[str] = []
        self._ack: SipRequest | None = None
        self._offer = b""
        self._closed = False

    # Lifecycle ---------------------------------------------------------------------------------

    async def open(self) -> None:
        """Bind this call's SIP socket and resolve the next hop (off the event loop)."""
        loop = asyncio.get_running_loop()
        host, port = self.next_hop
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        if not infos:
            raise DialFailed("failed", None, f"cannot resolve {host}")
        self._hop = infos[0][4][:2]
        self._sip, _ = await loop.create_datagram_endpoint(
            lambda: _Socket(self._received), local_addr=(self.local_host, 0)
        )

    def close(self) -> None:
        self._closed = True
        if self._sip is not None:
            self._sip.close()

    @property
    def local_port(self) -> int:
        return self._sip.get_extra_info("sockname")[1]

    @property
    def hop_address(self) -> tuple[str, int]:
        """The next hop's IP address and port, once `open` resolved it."""
        return self._hop

    # Placing the call --------------------------------------------------------------------------

    async def dial(self, offer: bytes, ring_timeout: float) -> bytes:
        """Ring the callee; the SDP answer once they answer (ACK sent). Raises DialFailed."""
        self._offer = offer
        deadline = time.monotonic() + ring_timeout
        authorization: tuple[str, str] | None = None
        for _attempt in range(MAX_AUTH_TRIES + 1):
            invite = self._request("INVITE", str(self.target), body=offer)
            if authorization is not None:
                invite.headers.add(*authorization)
            response = await self._invite(invite, deadline)
            if response.status in (401, 407) and authorization is None:
                authorization = self._authorization(invite, response)
                continue
            if 200 <= response.status < 300:
                self._confirm(invite, response)
                return response.body
            raise DialFailed(outcome_for(response.status), response.status, response.reason)
        raise DialFailed("failed", response.status, f"{response.reason} (credentials refused)")

    async def _invite(self, invite: SipRequest, deadline: float) -> SipResponse:
        """The INVITE client transaction: retransmit until a provisional response (Timer A), wait for the
        final one until `deadline`, then CANCEL. Non-2xx finals are ACKed here (§17.1.1.3)."""
        key = (invite.cseq.number, "INVITE")
        responses = self._waiting[key] = asyncio.Queue()
        interval, started, provisional = T1, time.monotonic(), False
        try:
            self._send(invite)
            while True:
                now = time.monotonic()
                if now >= deadline:
                    if not provisional:  # §9.1: no CANCEL before a provisional response
                        raise DialFailed("no-answer", None, "no response before the ring timeout")
                    return await self._cancel(invite, responses)
                if not provisional and now - started >= TIMER_B:
                    raise DialFailed("failed", None, f"no response to INVITE in {TIMER_B:.0f} s")
                wait = deadline - now if provisional else min(interval, deadline - now)
                try:
                    response = await asyncio.wait_for(responses.get(), wait)
                except TimeoutError:
                    if not provisional:
                        self._send(invite)
                        interval = min(interval * 2, T2)
                    continue
                self.statuses.append(response.status)
                if response.status < 200:
                    provisional = True
                    if self.on_progress is not None and response.status > 100:
                        self.on_progress(response.status, response.reason)
                    continue
                if response.status >= 300:
                    self._send(self._error_ack(invite, response))
                return response
        finally:
            # Retransmitted finals are answered in _received: a late 2xx is ACKed, a non-2xx re-ACKed.
            self._waiting.pop(key, None)

    async def _cancel(self, invite: SipRequest, responses: asyncio.Queue[SipResponse]) -> SipResponse:
        """Ring timeout: CANCEL (same branch, §9.1); the INVITE then ends with 487, or with a 2xx when
        the callee answered as the CANCEL crossed it (the call then goes on as answered)."""
        cancel = SipRequest(
            "CANCEL",
            invite.uri,
            [
                ("Via", invite.header("Via")),
                ("Max-Forwards", "70"),
                ("From", invite.header("From")),
                ("To", invite.header("To")),
                ("Call-ID", self.call_id),
                ("CSeq", f"{invite.cseq.number} CANCEL"),
                *[("Route", route) for route in invite.headers.get_all("Route")],
            ],
        )
        logger.info(f"SIP outbound {self.call_id}: no answer before the ring timeout; CANCEL")
        cancel_key = (invite.cseq.number, "CANCEL")
        self._waiting[cancel_key] = asyncio.Queue()
        deadline, interval = time.monotonic() + CANCEL_WAIT_SECS, T1
        try:
            self._send(cancel)
            while (left := deadline - time.monotonic()) > 0:
                try:
                    response = await asyncio.wait_for(responses.get(), min(interval, left))
                except TimeoutError:
                    if self._waiting[cancel_key].empty():
                        self._send(cancel)
                        interval = min(interval * 2, T2)
                    continue
                self.statuses.append(response.status)
                if response.status < 200:
                    continue
                if response.status >= 300:
                    self._send(self._error_ack(invite, response))
                return response
        finally:
            self._waiting.pop(cancel_key, None)
        return SipResponse(487, "Request Terminated (no final response after CANCEL)")

    def _authorization(self, invite: SipRequest, challenge: SipResponse) -> tuple[str, str]:
        """The Authorization (401) or Proxy-Authorization (407) header answering `challenge`."""
        status = challenge.status
        asked = challenge.header("WWW-Authenticate" if status == 401 else "Proxy-Authenticate") or ""
        params = parse_digest_credentials(asked)
        if self.credentials is None:
            raise DialFailed(
                "failed",
                status,
                f"{challenge.reason}: the callee asks for credentials and none are configured",
            )
        if params is None or "nonce" not in params or "realm" not in params:
            raise DialFailed("failed", status, f"{challenge.reason}: unusable challenge {asked!r}")
        realm = params["realm"]
        if self.credentials.realm is not None and realm != self.credentials.realm:
            raise DialFailed(
                "failed",
                status,
                f"challenge for realm {realm!r}, credentials are for {self.credentials.realm!r}",
            )
        algorithm = params.get("algorithm", "MD5").upper()
        if algorithm not in ("MD5", "SHA-256"):
            raise DialFailed(
                "failed", status, f"digest algorithm {algorithm} is not supported (MD5, SHA-256)"
            )
        qop = "auth" if "auth" in [q.strip() for q in params.get("qop", "").split(",")] else None
        nc, cnonce = ("00000001", secrets.token_hex(8)) if qop else (None, None)
        user, uri = self.credentials.username, invite.uri
        digest = digest_response(
            algorithm, user, realm, self.credentials.password, "INVITE", uri, params["nonce"], nc, cnonce, qop
        )
        fields = [
            f'username="{user}"',
            f'realm="{realm}"',
            f'nonce="{params["nonce"]}"',
            f'uri="{uri}"',
            f'response="{digest}"',
            f"algorithm={algorithm}",
        ]
        if qop:
            fields += [f"qop={qop}", f"nc={nc}", f'cnonce="{cnonce}"']
        if "opaque" in params:
            fields.append(f'opaque="{params["opaque"]}"')
        name = "Authorization" if status == 401 else "Proxy-Authorization"
        return name, "Digest " + ", ".join(fields)

    def _confirm(self, invite: SipRequest, response: SipResponse) -> None:
        """2xx: the dialog exists. Its remote target and route set (§12.1.2), then the ACK (§13.2.2.4)."""
        self.answered = True
        self.to_header = response.header("To") or self.to_header
        contact = response.contact_uri
        self._remote_target = str(contact) if contact is not None else invite.uri
        self._route = list(
            reversed([r for value in response.headers.get_all("Record-Route") for r in _split(value)])
        )
        ack = self._request("ACK", self._remote_target)
        ack.headers.set("CSeq", f"{invite.cseq.number} ACK")
        self._ack = ack
        self._send(ack)

    def _error_ack(self, invite: SipRequest, response: SipResponse) -> SipRequest:
        """The ACK for a non-2xx final response: part of the INVITE transaction, same branch (§17.1.1.3)."""
        return SipRequest(
            "ACK",
            invite.uri,
            [
                ("Via", invite.header("Via")),
                ("Max-Forwards", "70"),
                ("From", invite.header("From")),
                ("To", response.header("To") or invite.header("To")),
                ("Call-ID", self.call_id),
                ("CSeq", f"{invite.cseq.number} ACK"),
                *[("Route", route) for route in invite.headers.get_all("Route")],
            ],
        )

    # In the dialog -----------------------------------------------------------------------------

    async def hang_up(self) -> int | None:
        """BYE (when answered and the callee has not hung up), then close; the BYE's final status."""
        status = None
        if self.answered and not self.ended.is_set() and not self._closed:
            bye = self._request("BYE", self._remote_target)
            key = (bye.cseq.number, "BYE")
            responses = self._waiting[key] = asyncio.Queue()
            deadline, interval = time.monotonic() + BYE_WAIT_SECS, T1
            try:
                self._send(bye)
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        response = await asyncio.wait_for(responses.get(), min(interval, left))
                    except TimeoutError:
                        self._send(bye)
                        interval = min(interval * 2, T2)
                        continue
                    if response.status >= 200:
                        status = response.status
                        break
            finally:
                self._waiting.pop(key, None)
            self.ended.set()
        self.close()
        return status

    def _received(self, data: bytes, addr) -> None:
        if not data.strip():
            return  # keep-alive
        try:
            message = SipMessage.parse(data)
            if message.call_id != self.call_id:
                return
        except (SipParseError, ValueError) as exc:
            logger.info(f"SIP outbound {self.call_id}: unparsable message from {addr} dropped: {exc}")
            return
        if isinstance(message, SipResponse):
            self._response(message)
        else:
            self._request_in(message, addr)

    def _response(self, response: SipResponse) -> None:
        cseq = response.cseq
        queue = self._waiting.get((cseq.number, cseq.method))
        if queue is not None:
            queue.put_nowait(response)
            return
        if cseq.method == "INVITE" and 200 <= response.status < 300:
            if self._ack is not None and cseq.number == self._ack.cseq.number:
                self._send(self._ack)  # our ACK was lost: the 2xx comes again
            else:
                # A 2xx after we gave up (CANCEL crossed the answer): confirm and end that dialog.
                logger.info(f"SIP outbound {self.call_id}: answered after CANCEL; hanging up")
                self.answered = True
                self.to_header = response.header("To") or self.to_header
                contact = response.contact_uri
                self._remote_target = str(contact) if contact is not None else str(self.target)
                ack = self._request("ACK", self._remote_target)
                ack.headers.set("CSeq", f"{cseq.number} ACK")
                self._send(ack)
                asyncio.get_running_loop().create_task(self.hang_up())

    def _request_in(self, request: SipRequest, addr) -> None:
        method = request.method
        if method == "ACK":
            return
        if method == "BYE":
            self._reply(request.response(200), addr)
            self.ended.set()
        elif method == "INVITE":
            # A re-INVITE (session refresh, new address): we keep our media as it is and offer it again.
            body = self._offer if self.answered else b""
            headers = [("Contact", self._contact()), ("Content-Type", "application/sdp")] if body else []
            self._reply(request.response(200 if body else 488, headers=headers, body=body), addr)
        elif method in ("OPTIONS", "INFO", "UPDATE", "NOTIFY"):
            self._reply(request.response(200), addr)
        else:
            self._reply(request.response(501), addr)

    def _reply(self, response: SipResponse, addr) -> None:
        if self._sip is not None and not self._closed:
            self._sip.sendto(bytes(response), addr)

    # Building and sending ----------------------------------------------------------------------

    def _contact(self) -> str:
        return f"<sip:{self.from_user}@{self.contact_host}:{self.local_port}>"

    def _request(self, method: str, uri: str, body: bytes = b"") -> SipRequest:
        cseq = next(self._cseq)
        from_host = self.from_host or f"{self.contact_host}:{self.local_port}"
        headers = [
            ("Via", f"SIP/2.0/UDP {self.contact_host}:{self.local_port};branch={new_branch()};rport"),
            ("Max-Forwards", "70"),
            ("From", f"<sip:{self.from_user}@{from_host}>;tag={self.from_tag}"),
            ("To", self.to_header),
            ("Call-ID", self.call_id),
            ("CSeq", f"{cseq} {method}"),
            ("Contact", self._contact()),
            *[("Route", route) for route in self._route],
        ]
        if body:
            headers.append(("Content-Type", "application/sdp"))
        return SipRequest(method, uri, headers, body)

    def _send(self, message: SipMessage) -> None:
        if self._sip is None or self._closed:
            return
        self._sip.sendto(bytes(message), self._destination(message))

    def _destination(self, message: SipMessage) -> tuple[str, int]:
        """In the dialog, the first route (loose routing) or the remote target; before it, the next hop."""
        if not self.answered or self._remote_target is None:
            return self._hop
        try:
            uri = NameAddr.parse(self._route[0]).sip_uri if self._route else SipUri.parse(self._remote_target)
        except SipParseError:
            return self._hop
        try:
            ipaddress.ip_address(uri.host.strip("[]"))
        except ValueError:
            return self._hop  # a name would need resolving, which blocks: the next hop routes it on
        return (uri.host.strip("[]"), uri.port or SIP_DEFAULT_PORT)


def _split(value: str) -> list[str]:
    """Record-Route may hold several comma-separated addresses; commas inside <...> are not separators."""
    parts, depth, current = [], 0, []
    for char in value:
        if char == "<":
            depth += 1
        elif char == ">":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    if "".join(current).strip():
        parts.append("".join(current).strip())
    return parts
