"""The outbound dialog's RFC 3261 duties that SIPp's scenarios do not exercise, against a callee written
here on a plain UDP socket: the route set (Record-Route becomes Route, reversed), a retransmitted 2xx
ACKed again, a re-INVITE answered with our offer, a callee's BYE, and our SDP offer."""

import asyncio

import pytest

from transports.sip.message import SipMessage, SipRequest, SipResponse
from transports.sip.outbound import DialFailed, SipOutboundCall, offer_sdp
from transports.sip.values import SipUri


class Peer(asyncio.DatagramProtocol):
    def __init__(self):
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.inbox.put_nowait((SipMessage.parse(data), addr))

    async def next(self, method: str | None = None, timeout: float = 3.0):
        while True:
            message, addr = await asyncio.wait_for(self.inbox.get(), timeout)
            if method is None or getattr(message, "method", None) == method:
                return message, addr


@pytest.fixture
async def peer():
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    protocol.port = transport.get_extra_info("sockname")[1]
    yield protocol
    transport.close()


ANSWER = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"


def test_the_offer_lists_the_codecs_in_order_and_telephone_events():
    sdp = offer_sdp("10.0.0.2", 20000, ["PCMA", "PCMU"], session_id=7).decode()
    assert "m=audio 20000 RTP/AVP 8 0 101\r\n" in sdp
    assert "c=IN IP4 10.0.0.2\r\n" in sdp and "a=rtpmap:8 PCMA/8000" in sdp and "a=rtpmap:0 PCMU/8000" in sdp
    assert "a=rtpmap:101 telephone-event/8000" in sdp and "a=sendrecv" in sdp


async def test_route_set_ack_retransmitted_2xx_reinvite_and_bye(peer):
    dialog = SipOutboundCall(SipUri.parse(f"sip:bob@127.0.0.1:{peer.port}"), from_user="+15550001111")
    await dialog.open()
    offer = offer_sdp("127.0.0.1", 20000, ["PCMU"])
    dialling = asyncio.create_task(dialog.dial(offer, ring_timeout=5))
    invite, addr = await peer.next("INVITE")
    assert invite.uri == f"sip:bob@127.0.0.1:{peer.port}" and invite.body == offer
    assert invite.from_.sip_uri.user == "+15550001111" and invite.to.tag is None
    ok = invite.response(
        200,
        to_tag="callee1",
        headers=[
            ("Contact", f"<sip:bob@127.0.0.1:{peer.port}>"),
            ("Record-Route", f"<sip:127.0.0.1:{peer.port};lr;p=2>, <sip:127.0.0.1:{peer.port};lr;p=1>"),
            ("Content-Type", "application/sdp"),
        ],
        body=ANSWER,
    )
    peer.transport.sendto(bytes(ok), addr)
    assert await dialling == ANSWER
    ack, _ = await peer.next("ACK")
    assert ack.cseq.number == invite.cseq.number and ack.to.tag == "callee1"
    assert ack.uri == f"sip:bob@127.0.0.1:{peer.port}"
    # §12.1.2: the route set is the Record-Route list reversed.
    assert ack.headers.get_all("Route") == [
        f"<sip:127.0.0.1:{peer.port};lr;p=1>",
        f"<sip:127.0.0.1:{peer.port};lr;p=2>",
    ]
    # Our ACK was lost, as far as the callee knows: its 2xx comes again, and so does the ACK.
    peer.transport.sendto(bytes(ok), addr)
    again, _ = await peer.next("ACK")
    assert again.cseq.number == ack.cseq.number

    # A re-INVITE (a session refresh) is answered with our media as it is.
    reinvite = SipRequest(
        "INVITE",
        str(ack.contact_uri),
        [
            ("Via", f"SIP/2.0/UDP 127.0.0.1:{peer.port};branch=z9hG4bKre1"),
            ("From", ack.header("To")),
            ("To", ack.header("From")),
            ("Call-ID", dialog.call_id),
            ("CSeq", "1 INVITE"),
            ("Contact", f"<sip:bob@127.0.0.1:{peer.port}>"),
            ("Content-Type", "application/sdp"),
        ],
        ANSWER,
    )
    peer.transport.sendto(bytes(reinvite), addr)
    answer, _ = await peer.next()
    assert isinstance(answer, SipResponse) and answer.status == 200 and answer.body == offer

    # The callee hangs up.
    bye = SipRequest(
        "BYE", str(ack.contact_uri), [(n, v) for n, v in reinvite.headers if n != "Content-Type"]
    )
    bye.headers.set("CSeq", "2 BYE")
    bye.headers.set("Via", f"SIP/2.0/UDP 127.0.0.1:{peer.port};branch=z9hG4bKbye1")
    peer.transport.sendto(bytes(bye), addr)
    answer, _ = await peer.next()
    assert answer.status == 200 and answer.cseq.method == "BYE"
    await asyncio.wait_for(dialog.ended.wait(), 2)
    assert await dialog.hang_up() is None  # nothing more to send: the callee ended it


async def test_a_callee_that_never_responds_is_no_answer_at_the_ring_timeout(peer):
    dialog = SipOutboundCall(SipUri.parse(f"sip:bob@127.0.0.1:{peer.port}"))
    await dialog.open()
    with pytest.raises(DialFailed) as failed:
        await dialog.dial(offer_sdp("127.0.0.1", 20000, ["PCMU"]), ring_timeout=1.2)
    assert failed.value.outcome == "no-answer"
    sent = peer.inbox.qsize()
    assert sent >= 2  # the INVITE went again (Timer A) while nothing answered
    dialog.close()


async def test_another_calls_messages_are_ignored(peer):
    dialog = SipOutboundCall(SipUri.parse(f"sip:bob@127.0.0.1:{peer.port}"))
    await dialog.open()
    dialling = asyncio.create_task(dialog.dial(offer_sdp("127.0.0.1", 20000, ["PCMU"]), ring_timeout=3))
    invite, addr = await peer.next("INVITE")
    stranger = invite.response(486, to_tag="x")
    stranger.headers.set("Call-ID", "someone-else@127.0.0.1")
    peer.transport.sendto(bytes(stranger), addr)
    peer.transport.sendto(b"not SIP at all\r\n\r\n", addr)
    await asyncio.sleep(0.2)
    assert not dialling.done()
    peer.transport.sendto(bytes(invite.response(486, to_tag="y")), addr)
    with pytest.raises(DialFailed) as failed:
        await dialling
    assert failed.value.outcome == "busy" and failed.value.status == 486
    dialog.close()
