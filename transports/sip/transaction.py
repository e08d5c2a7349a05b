"""SIP transactions over UDP (RFC 3261 §17): the server side (§17.2) matches requests, absorbs
retransmissions and runs the timers; the client side (§17.1.2) carries the requests we send in a dialog.

`TransactionLayer.receive` sits between the UDP socket and the dialog code. A retransmitted request
re-sends the transaction's last response and goes no further; a new request creates a
`ServerTransaction`, through which the caller answers with `respond`. Timers run on the asyncio loop.

Left to other modules, on purpose:
- Retransmitting a 2xx to INVITE until its ACK arrives is the dialog's job (§13.3.1.4, §17.2.1): the
  INVITE transaction terminates as soon as the 2xx is sent, and that ACK comes back from `receive` as a
  `DialogAck`. No RFC 6026 Accepted state.
- The automatic 100 Trying after 200 ms (§17.2.1): the caller sends its own 100 (or answers sooner).
- Stamping `received`/`rport` into the request's Via (§18.2.1, RFC 3581) is the socket's job; we only
  honour them when choosing where responses go (§18.2.2), and `maddr` is ignored.
- Reliable transports (Timers G, I and J are set to zero there) and transport-error reporting (§17.2.4).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

from transports.sip.message import MAGIC_COOKIE, SipRequest, SipResponse

logger = logging.getLogger(__name__)

# §17.1.1.1 and Table 4: RTT estimate, longest retransmit interval, longest time a message lives.
T1 = 0.5
T2 = 4.0
T4 = 5.0

SIP_DEFAULT_PORT = 5060

Address = tuple[str, int]
SendDatagram = Callable[[bytes, Address], None]
# ("3261", branch, host, port, method) or ("2543", ...): see `transaction_key`.
TransactionKey = tuple[str | int | None, ...]


class TransactionState(enum.Enum):
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    TERMINATED = "Terminated"


@dataclass(frozen=True)
class DialogAck:
    """An ACK that belongs to no server transaction: the ACK for a 2xx, which the dialog consumes (§13.3.1.4)."""

    request: SipRequest
    addr: Address


def transaction_key(request: SipRequest, method: str | None = None) -> TransactionKey:
    """The §17.2.3 matching key; `method` overrides the request's (ACK and CANCEL look up the INVITE).

    With a magic-cookie branch: (branch, sent-by host, sent-by port, method). Without one, the RFC 2543
    fallback: Request-URI, From tag, Call-ID, CSeq number and the whole top Via. The To tag is left out
    so that an INVITE (no To tag) and the ACK for its error response (tag added by us) share a key;
    `TransactionLayer.receive` checks the ACK's To tag against our response's separately.
    """
    via = request.via
    method = method or request.method
    if via.branch and via.branch.startswith(MAGIC_COOKIE):
        return ("3261", via.branch, via.host.lower(), via.port, method)
    return ("2543", request.uri, request.from_.tag, request.call_id, request.cseq.number, str(via), method)


def response_address(request: SipRequest, addr: Address) -> Address:
    """Where responses to `request` go over UDP (§18.2.2, RFC 3581 §4).

    With `rport` asked for, the source address the request came from. Otherwise the `received` host,
    or failing that the source IP (which §18.2.1 would have stamped as `received` whenever it differs
    from sent-by, and which spares us resolving a sent-by name), at the sent-by port.
    """
    via = request.via
    if via.rport_requested:
        return (via.received or addr[0], via.rport or addr[1])
    return (via.received or addr[0], via.port or SIP_DEFAULT_PORT)


class ServerTransaction:
    """One INVITE (§17.2.1) or non-INVITE (§17.2.2) server transaction; made by `TransactionLayer`."""

    def __init__(self, layer: TransactionLayer, key: TransactionKey, request: SipRequest, addr: Address):
        self.layer = layer
        self.key = key
        self.request = request
        self.addr = addr
        self.destination = response_address(request, addr)
        self.is_invite = request.method == "INVITE"
        self.state = TransactionState.PROCEEDING if self.is_invite else TransactionState.TRYING
        self.last_response: SipResponse | None = None
        self._last_bytes: bytes | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._timer_g_interval = layer.t1

    def __repr__(self) -> str:
        return f"ServerTransaction({self.request.method} {self.state.value}, to {self.destination})"

    def respond(self, response: SipResponse) -> None:
        """Send `response` and move the state machine; responses after the final one are discarded."""
        if self.state not in (TransactionState.TRYING, TransactionState.PROCEEDING):
            # §17.2.1: once a final response is out, further ones from the TU MUST be discarded.
            logger.debug("discarding %s in %s state", response, self.state.value)
            return
        self.last_response = response
        self._last_bytes = bytes(response)
        self._transmit()
        if response.status < 200:
            self.state = TransactionState.PROCEEDING
        elif self.is_invite and response.status < 300:
            self._terminate()
        elif self.is_invite:
            self.state = TransactionState.COMPLETED
            self._start("G", self._timer_g_interval, self._on_timer_g)
            self._start("H", 64 * self.layer.t1, self._on_timer_h)
        else:
            self.state = TransactionState.COMPLETED
            self._start("J", 64 * self.layer.t1, self._terminate)

    def close(self) -> None:
        """Cancel the timers and leave the transaction table without sending anything."""
        self._terminate()

    # Requests that matched this transaction ----------------------------------------------------

    def _on_retransmission(self) -> None:
        # Trying: nothing to re-send yet. Confirmed: the INVITE is absorbed (§17.2.1).
        if self.state in (TransactionState.PROCEEDING, TransactionState.COMPLETED):
            self._transmit()

    def _on_ack(self) -> None:
        if self.state is TransactionState.COMPLETED:
            self.state = TransactionState.CONFIRMED
            self._cancel("G")
            self._cancel("H")
            self._start("I", self.layer.t4, self._terminate)

    # Timers ------------------------------------------------------------------------------------

    def _on_timer_g(self) -> None:
        self._transmit()
        self._timer_g_interval = min(2 * self._timer_g_interval, self.layer.t2)
        self._start("G", self._timer_g_interval, self._on_timer_g)

    def _on_timer_h(self) -> None:
        # No ACK within 64*T1: the caller never heard our final response (§17.2.1).
        self._terminate()
        if self.layer.on_timeout is not None:
            self.layer.on_timeout(self)

    def _start(self, name: str, delay: float, callback: Callable[[], None]) -> None:
        self._cancel(name)
        self._timers[name] = asyncio.get_running_loop().call_later(delay, callback)

    def _cancel(self, name: str) -> None:
        handle = self._timers.pop(name, None)
        if handle is not None:
            handle.cancel()

    def _transmit(self) -> None:
        if self._last_bytes is not None:
            self.layer.send(self._last_bytes, self.destination)

    def _terminate(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self.state = TransactionState.TERMINATED
        self.layer._forget(self)


class TransactionLayer:
    """The server transactions of one UDP socket, keyed as §17.2.3 says."""

    def __init__(
        self,
        send: SendDatagram,
        *,
        t1: float = T1,
        t2: float = T2,
        t4: float = T4,
        on_timeout: Callable[[ServerTransaction], None] | None = None,
    ):
        self.send = send
        self.t1, self.t2, self.t4 = t1, t2, t4
        self.on_timeout = on_timeout
        self._transactions: dict[TransactionKey, ServerTransaction] = {}

    def __len__(self) -> int:
        return len(self._transactions)

    def receive(self, request: SipRequest, addr: Address) -> ServerTransaction | DialogAck | None:
        """Route one request: a new transaction, a `DialogAck`, or None when it was a retransmission
        (or an ACK for our error response) that the layer has dealt with."""
        if request.method == "ACK":
            transaction = self._transactions.get(transaction_key(request, "INVITE"))
            if transaction is None or not self._acks_our_response(request, transaction):
                return DialogAck(request, addr)
            transaction._on_ack()
            return None
        key = transaction_key(request)
        transaction = self._transactions.get(key)
        if transaction is not None:
            transaction._on_retransmission()
            return None
        transaction = ServerTransaction(self, key, request, addr)
        self._transactions[key] = transaction
        return transaction

    def matching_invite(self, cancel: SipRequest) -> ServerTransaction | None:
        """The INVITE transaction a CANCEL is aimed at (§9.2), if it is still running."""
        return self._transactions.get(transaction_key(cancel, "INVITE"))

    def close(self) -> None:
        """Cancel every timer and drop every transaction."""
        for transaction in list(self._transactions.values()):
            transaction.close()

    def _acks_our_response(self, ack: SipRequest, transaction: ServerTransaction) -> bool:
        if transaction.key[0] == "3261":
            return True
        # RFC 2543 fallback: the ACK's To tag must be the one on the response we sent (§17.2.3).
        response = transaction.last_response
        return response is not None and ack.to.tag == response.to.tag

    def _forget(self, transaction: ServerTransaction) -> None:
        if self._transactions.get(transaction.key) is transaction:
            del self._transactions[transaction.key]


class ClientTransaction:
    """A non-INVITE client transaction over UDP (§17.1.2): Timer E retransmits, starting at T1 and
    doubling to T2 (every T2 once a provisional response came), Timer F gives up after 64*T1.

    Whoever sends the request routes the responses whose Via branch is `branch` to `receive`."""

    def __init__(self, send: SendDatagram, request: SipRequest, destination: Address, t1: float, t2: float):
        self.request = request
        self.branch = request.via.branch or ""
        self.method = request.method
        self._send = send
        self._data = bytes(request)
        self._destination = destination
        self._t2 = t2
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
