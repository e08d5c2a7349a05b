"""SIP server transactions (RFC 3261 §17.2) with millisecond timers, so each RFC behaviour runs in real time."""

import asyncio

import pytest

from transports.sip.message import SipMessage, SipRequest, SipResponse, new_tag
from transports.sip.transaction import (
    T1,
    T2,
    T4,
    DialogAck,
    ServerTransaction,
    TransactionLayer,
    TransactionState,
    response_address,
)

CALLER = ("127.0.0.1", 5061)
FAST = {"t1": 0.01, "t2": 0.04, "t4": 0.05}
# Timer H and J are 64*T1; a smaller T1 keeps those tests short.
FASTER = {"t1": 0.004, "t2": 0.04, "t4": 0.05}

INVITE = (
    b"INVITE sip:agent@127.0.0.1:5060 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-4242-1-0\r\n"
    b'From: "caller" <sip:caller@127.0.0.1:5061>;tag=4242SIPpTag001\r\n'
    b"To: <sip:agent@127.0.0.1:5060>\r\n"
    b"Call-ID: 1-4242@127.0.0.1\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Contact: sip:caller@127.0.0.1:5061\r\n"
    b"Max-Forwards: 70\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def ack_for_error(to_tag: str) -> bytes:
    """The ACK for a non-2xx: same branch as the INVITE, To tag from our response (§17.1.1.3)."""
    return (
        b"ACK sip:agent@127.0.0.1:5060 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-4242-1-0\r\n"
        b'From: "caller" <sip:caller@127.0.0.1:5061>;tag=4242SIPpTag001\r\n'
        b"To: <sip:agent@127.0.0.1:5060>;tag=" + to_tag.encode() + b"\r\n"
        b"Call-ID: 1-4242@127.0.0.1\r\n"
        b"CSeq: 1 ACK\r\n"
        b"Max-Forwards: 70\r\n"
        b"Content-Length: 0\r\n\r\n"
    )


def ack_for_2xx(to_tag: str) -> bytes:
    """The ACK for a 2xx is its own transaction with a new branch (§13.2.2.4)."""
    return ack_for_error(to_tag).replace(b"z9hG4bK-4242-1-0", b"z9hG4bK-4242-5-0")


BYE = (
    b"BYE sip:agent@127.0.0.1:5060 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-4242-9-7\r\n"
    b'From: "caller" <sip:caller@127.0.0.1:5061>;tag=4242SIPpTag001\r\n'
    b"To: <sip:agent@127.0.0.1:5060>;tag=agent01\r\n"
    b"Call-ID: 1-4242@127.0.0.1\r\n"
    b"CSeq: 2 BYE\r\n"
    b"Max-Forwards: 70\r\n"
    b"Content-Length: 0\r\n\r\n"
)

OPTIONS = (
    b"OPTIONS sip:agent@203.0.113.5 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 10.0.0.7:5060;rport;branch=z9hG4bKopt77\r\n"
    b"From: <sip:probe@pbx.example.com>;tag=probe1\r\n"
    b"To: <sip:agent@203.0.113.5>\r\n"
    b"Call-ID: opt-77@10.0.0.7\r\n"
    b"CSeq: 77 OPTIONS\r\n"
    b"Max-Forwards: 70\r\n"
    b"Content-Length: 0\r\n\r\n"
)

CANCEL = (
    b"CANCEL sip:agent@127.0.0.1:5060 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-4242-1-0\r\n"
    b'From: "caller" <sip:caller@127.0.0.1:5061>;tag=4242SIPpTag001\r\n'
    b"To: <sip:agent@127.0.0.1:5060>\r\n"
    b"Call-ID: 1-4242@127.0.0.1\r\n"
    b"CSeq: 1 CANCEL\r\n"
    b"Max-Forwards: 70\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def request(data: bytes) -> SipRequest:
    return SipRequest.parse(data)


class Wire:
    """A fake `send` that records (datagram, address, loop time)."""

    def __init__(self):
        self.sent: list[tuple[bytes, tuple[str, int], float]] = []

    def __call__(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr, asyncio.get_running_loop().time()))

    def statuses(self) -> list[int]:
        return [SipResponse.parse(data).status for data, _, _ in self.sent]


@pytest.fixture
def wire():
    return Wire()


def new_transaction(layer: TransactionLayer, data: bytes, addr=CALLER) -> ServerTransaction:
    transaction = layer.receive(request(data), addr)
    assert isinstance(transaction, ServerTransaction)
    return transaction


def test_rfc_timer_defaults():
    assert (T1, T2, T4) == (0.5, 4.0, 5.0)
    layer = TransactionLayer(lambda data, addr: None)
    assert (layer.t1, layer.t2, layer.t4) == (T1, T2, T4)


async def test_retransmitted_invite_in_proceeding_resends_the_180(wire):
    layer = TransactionLayer(wire, **FAST)
    invite = new_transaction(layer, INVITE)
    assert invite.state is TransactionState.PROCEEDING
    invite.respond(invite.request.response(180, to_tag="agent01"))
    assert layer.receive(request(INVITE), CALLER) is None
    assert wire.statuses() == [180, 180]
    assert wire.sent[0][0] == wire.sent[1][0]
    assert wire.sent[1][1] == CALLER
    assert len(layer) == 1
    layer.close()


async def test_retransmitted_invite_before_any_response_is_absorbed(wire):
    layer = TransactionLayer(wire, **FAST)
    new_transaction(layer, INVITE)
    assert layer.receive(request(INVITE), CALLER) is None
    assert wire.sent == []
    layer.close()


async def test_error_response_retransmits_with_timer_g_until_ack(wire):
    layer = TransactionLayer(wire, **FAST)
    invite = new_transaction(layer, INVITE)
    busy = invite.request.response(486, to_tag="agent01")
    invite.respond(busy)
    assert invite.state is TransactionState.COMPLETED
    await asyncio.sleep(0.125)  # sends at 0, T1, 3T1, 7T1, 11T1 (gaps T1, 2T1, 4T1=T2, T2)
    times = [t for _, _, t in wire.sent]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(gaps) >= 4
    for gap, expected in zip(gaps, [0.01, 0.02, 0.04, 0.04], strict=False):
        assert expected - 0.002 <= gap <= expected + 0.015, gaps
    assert set(wire.statuses()) == {486}

    assert layer.receive(request(ack_for_error("agent01")), CALLER) is None  # absorbed, not a dialog ACK
    assert invite.state is TransactionState.CONFIRMED
    count = len(wire.sent)
    assert layer.receive(request(INVITE), CALLER) is None  # Confirmed absorbs INVITE retransmissions too
    await asyncio.sleep(0.03)
    assert len(wire.sent) == count
    await asyncio.sleep(0.04)  # Timer I = T4 after the ACK
    assert invite.state is TransactionState.TERMINATED
    assert len(layer) == 0


async def test_retransmitted_invite_in_completed_resends_the_error(wire):
    layer = TransactionLayer(wire, t1=1.0)
    invite = new_transaction(layer, INVITE)
    invite.respond(invite.request.response(486, to_tag="agent01"))
    assert layer.receive(request(INVITE), CALLER) is None
    assert wire.statuses() == [486, 486]
    layer.close()


async def test_no_ack_timer_h_reports_timeout_and_removes(wire):
    timed_out = []
    layer = TransactionLayer(wire, **FASTER, on_timeout=timed_out.append)
    invite = new_transaction(layer, INVITE)
    invite.respond(invite.request.response(480, to_tag="agent01"))
    await asyncio.sleep(64 * FASTER["t1"] - 0.03)
    assert timed_out == [] and len(layer) == 1
    await asyncio.sleep(0.06)
    assert timed_out == [invite]
    assert invite.state is TransactionState.TERMINATED
    assert len(layer) == 0
    count = len(wire.sent)
    await asyncio.sleep(0.05)
    assert len(wire.sent) == count  # Timer G stopped with it
    # A late ACK no longer matches anything, so it surfaces as a dialog-level ACK.
    assert isinstance(layer.receive(request(ack_for_error("agent01")), CALLER), DialogAck)


async def test_200_terminates_invite_and_its_ack_goes_to_the_dialog(wire):
    layer = TransactionLayer(wire, **FAST)
    invite = new_transaction(layer, INVITE)
    invite.respond(invite.request.response(180, to_tag="agent01"))
    invite.respond(invite.request.response(200, to_tag="agent01"))
    assert invite.state is TransactionState.TERMINATED
    assert len(layer) == 0
    await asyncio.sleep(0.03)
    assert wire.statuses() == [180, 200]  # the transaction does not retransmit a 2xx

    ack = request(ack_for_2xx("agent01"))
    result = layer.receive(ack, CALLER)
    assert result == DialogAck(ack, CALLER)
    # Even an ACK reusing the INVITE's branch is the dialog's once the transaction is gone.
    assert isinstance(layer.receive(request(ack_for_error("agent01")), CALLER), DialogAck)


async def test_responses_after_the_final_one_are_discarded(wire):
    layer = TransactionLayer(wire, t1=1.0)
    invite = new_transaction(layer, INVITE)
    invite.respond(invite.request.response(486, to_tag="agent01"))
    invite.respond(invite.request.response(200, to_tag="agent01"))
    assert wire.statuses() == [486]
    assert invite.last_response is not None and invite.last_response.status == 486
    layer.close()


async def test_non_invite_retransmission_resends_final_and_timer_j_removes(wire):
    layer = TransactionLayer(wire, **FASTER)
    bye = new_transaction(layer, BYE)
    assert bye.state is TransactionState.TRYING
    assert layer.receive(request(BYE), CALLER) is None  # Trying: nothing to re-send yet
    assert wire.sent == []
    bye.respond(bye.request.response(200))
    assert bye.state is TransactionState.COMPLETED
    assert layer.receive(request(BYE), CALLER) is None
    assert wire.statuses() == [200, 200]
    await asyncio.sleep(0.04)
    assert wire.statuses() == [200, 200]  # no Timer G for non-INVITE: only retransmissions re-send
    await asyncio.sleep(64 * FASTER["t1"])
    assert bye.state is TransactionState.TERMINATED
    assert len(layer) == 0
    assert isinstance(layer.receive(request(BYE), CALLER), ServerTransaction)  # a new one after Timer J
    layer.close()


async def test_non_invite_provisional_moves_to_proceeding(wire):
    layer = TransactionLayer(wire, t1=1.0)
    bye = new_transaction(layer, BYE)
    bye.respond(bye.request.response(100))
    assert bye.state is TransactionState.PROCEEDING
    assert layer.receive(request(BYE), CALLER) is None
    assert wire.statuses() == [100, 100]
    layer.close()


async def test_key_is_branch_sent_by_and_method(wire):
    layer = TransactionLayer(wire, t1=1.0)
    new_transaction(layer, INVITE)
    # Same branch from another sent-by port: a different transaction.
    other_port = INVITE.replace(b"127.0.0.1:5061;branch", b"127.0.0.1:5062;branch")
    assert isinstance(layer.receive(request(other_port), CALLER), ServerTransaction)
    # CANCEL shares the INVITE's branch but is its own transaction (§9.2), and finds the INVITE.
    cancel = new_transaction(layer, CANCEL)
    assert cancel.request.method == "CANCEL"
    assert layer.matching_invite(cancel.request) is not None
    assert layer.matching_invite(cancel.request).request.method == "INVITE"
    assert len(layer) == 3
    layer.close()
    assert len(layer) == 0


async def test_rfc2543_requests_match_by_fallback_key(wire):
    old_invite = INVITE.replace(b";branch=z9hG4bK-4242-1-0", b"")
    layer = TransactionLayer(wire, t1=1.0)
    invite = new_transaction(layer, old_invite)
    invite.respond(invite.request.response(486, to_tag="agent01"))
    assert layer.receive(request(old_invite), CALLER) is None
    assert wire.statuses() == [486, 486]
    old_ack = ack_for_error("agent01").replace(b";branch=z9hG4bK-4242-1-0", b"")
    assert layer.receive(request(old_ack), CALLER) is None
    assert invite.state is TransactionState.CONFIRMED
    # An ACK with another To tag is not for our response.
    other_ack = ack_for_error("someone-else").replace(b";branch=z9hG4bK-4242-1-0", b"")
    assert isinstance(layer.receive(request(other_ack), CALLER), DialogAck)
    layer.close()


async def test_rport_sends_to_the_source_address(wire):
    layer = TransactionLayer(wire, t1=1.0)
    nat = ("198.51.100.9", 40123)
    options = new_transaction(layer, OPTIONS, nat)
    assert options.destination == nat
    options.respond(options.request.response(200, to_tag=new_tag()))
    assert wire.sent[0][1] == nat
    layer.close()


def test_response_address_rules():
    source = ("198.51.100.9", 40123)
    # No rport: the source IP (what `received` would say) at the sent-by port.
    assert response_address(request(INVITE), source) == ("198.51.100.9", 5061)
    with_received = INVITE.replace(b"5061;branch", b"5061;received=192.0.2.1;branch")
    assert response_address(request(with_received), source) == ("192.0.2.1", 5061)
    no_port = INVITE.replace(b"127.0.0.1:5061;branch", b"pbx.example.com;branch")
    assert response_address(request(no_port), source) == ("198.51.100.9", 5060)
    # rport asked for: the source address; a stamped rport/received pair is honoured as written.
    assert response_address(request(OPTIONS), source) == source
    stamped = OPTIONS.replace(b";rport;", b";received=192.0.2.2;rport=5099;")
    assert response_address(request(stamped), source) == ("192.0.2.2", 5099)


async def test_close_cancels_timers(wire):
    timed_out = []
    layer = TransactionLayer(wire, **FASTER, on_timeout=timed_out.append)
    invite = new_transaction(layer, INVITE)
    invite.respond(invite.request.response(486, to_tag="agent01"))
    layer.close()
    assert invite.state is TransactionState.TERMINATED
    count = len(wire.sent)
    await asyncio.sleep(0.03)
    assert len(wire.sent) == count == 1
    assert timed_out == []


def test_datagrams_parse_as_requests():
    for data in (INVITE, BYE, OPTIONS, CANCEL, ack_for_error("x"), ack_for_2xx("x")):
        assert isinstance(SipMessage.parse(data), SipRequest)
