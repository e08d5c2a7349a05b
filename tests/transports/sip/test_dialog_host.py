"""A server-side `Dialog` driven through a stand-in `DialogHost`: no SipServer, no socket. The host
has the Protocol's members and nothing else, and fails loudly on any other attribute, so these tests
break if a dialog reaches past the interface."""

import asyncio
import subprocess
import sys

import pytest

from transports.sip.dialog import CallRejected, Dialog, DialogHost, LocalEnd
from transports.sip.message import SipMessage, SipRequest, SipResponse
from transports.sip.transaction import ClientTransaction, ServerTransaction, TransactionLayer

T1, T2 = 0.01, 0.04  # 64*T1 = 0.64 s
PEER = ("127.0.0.1", 5070)
LOCAL = LocalEnd("127.0.0.1", 5080, "test-agent")
SDP_OFFER = (
    b"v=0\r\no=caller 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\n"
)
SDP_ANSWER = SDP_OFFER.replace(b"caller", b"agent").replace(b"6000", b"40000")  # the handler's, opaque here


class Host:
    """Records what the dialog asks of its host; the DialogHost members are its only attributes."""

    def __init__(self):
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.requests: list[ClientTransaction] = []
        self.responses: list[tuple[int, str | None, str | None, str | None]] = []
        self.no_ack: list[Dialog] = []
        self.forgotten: list[Dialog] = []

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))

    def start_request(self, request: SipRequest, addr: tuple[str, int]) -> ClientTransaction:
        transaction = ClientTransaction(self.send, request, addr, T1, T2)
        self.requests.append(transaction)
        transaction.start()
        return transaction

    def respond(self, tx, status, reason=None, *, to_tag=None, refusal=None) -> None:
        self.responses.append((status, reason, to_tag, refusal))

    def on_no_ack(self, dialog: Dialog) -> None:
        self.no_ack.append(dialog)

    def forget(self, dialog: Dialog) -> None:
        self.forgotten.append(dialog)

    def __getattr__(self, name: str):
        if name.startswith("__"):  # copy, pickle and pytest's reports probe for these
            raise AttributeError(name)
        raise AssertionError(f"the dialog reached past DialogHost for host.{name}")

    def messages(self) -> list[SipRequest | SipResponse]:
        return [SipMessage.parse(data) for data, _ in self.sent]


class Handler:
    def __init__(self):
        self.offers: list[tuple[bytes, bool]] = []
        self.ends: list[str] = []
        self.refusal: Exception | None = None

    async def offer(self, dialog: Dialog, sdp: bytes) -> bytes:
        self.offers.append((sdp, dialog.confirmed))
        if self.refusal is not None:
            raise self.refusal
        return SDP_ANSWER

    async def start(self, dialog: Dialog) -> None:
        pass

    async def end(self, dialog: Dialog, reason: str) -> None:
        self.ends.append(reason)


def request(method: str, cseq: int, *, to_tag: str | None = None, contact: str = "sip:caller@127.0.0.1:5070",
            body: bytes = b"") -> SipRequest:
    to = "<sip:agent@127.0.0.1>" + (f";tag={to_tag}" if to_tag else "")
    text = (
        f"{method} sip:agent@127.0.0.1:5080 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-{method}-{cseq};rport\r\n"
        f"From: <sip:caller@127.0.0.1>;tag=caller\r\nTo: {to}\r\nCall-ID: call-1\r\nCSeq: {cseq} {method}\r\n"
        f"Contact: <{contact}>\r\nMax-Forwards: 70\r\n"
        + ("Content-Type: application/sdp\r\n" if body else "")
        + f"Content-Length: {len(body)}\r\n\r\n"
    )
    return SipMessage.parse(text.encode() + body)


def invite_transaction(layer: TransactionLayer, invite: SipRequest) -> ServerTransaction:
    tx = layer.receive(invite, PEER)
    assert isinstance(tx, ServerTransaction)
    return tx


@pytest.fixture
def parts():
    host: DialogHost = Host()
    handler = Handler()
    layer = TransactionLayer(lambda data, addr: None, t1=T1, t2=T2, t4=T1)  # the INVITE's own transaction
    invite_tx = invite_transaction(layer, request("INVITE", 1, body=SDP_OFFER))
    dialog = Dialog(host, handler, invite_tx, "agent-tag", LOCAL, t1=T1, t2=T2)
    yield host, handler, layer, dialog
    layer.close()


async def started(coro, seconds: float) -> asyncio.Task:
    """`coro` as a task that has run for `seconds`; what it raised by then is raised here."""
    task = asyncio.create_task(coro)
    done, _ = await asyncio.wait([task], timeout=seconds)
    if done:
        task.result()
    return task


async def answered(host: Host, dialog: Dialog) -> SipResponse:
    """Answer the initial INVITE and ACK the 2xx: the dialog is confirmed."""
    await dialog.answer(dialog.invite_tx, dialog.invite)
    (ok,) = host.messages()
    assert dialog.acked(request("ACK", 1, to_tag=dialog.local_tag)) and dialog.confirm()
    return ok


async def test_the_answer_goes_out_through_the_host_and_the_ack_confirms(parts):
    host, handler, _, dialog = parts
    ok = await answered(host, dialog)
    assert (ok.status, ok.body, ok.to.tag) == (200, SDP_ANSWER, "agent-tag")
    assert ok.contact_uri.port == 5080 and ok.header("Server") == "test-agent"
    assert host.sent[0][1] == PEER  # rport: back to where the INVITE came from
    assert handler.offers == [(SDP_OFFER, False)] and dialog.confirmed and not dialog.confirm()
    await asyncio.sleep(4 * T1)
    assert len(host.sent) == 1  # the ACK stopped the 2xx retransmission


async def test_an_agent_hang_up_sends_bye_through_the_host_and_the_dialog_forgets_itself(parts):
    host, handler, _, dialog = parts
    await answered(host, dialog)
    hang_up = await started(dialog.hang_up(), 3 * T1)
    assert host.forgotten == [dialog] and dialog.ended  # out of the table at once: later requests get 481
    (transaction,) = host.requests
    byes = host.messages()[1:]
    assert len(byes) >= 2 and {bye.method for bye in byes} == {"BYE"}  # sent, then retransmitted
    assert byes[0].to.tag == "caller" and byes[0].from_.tag == "agent-tag" and host.sent[1][1] == PEER
    assert not hang_up.done()
    transaction.receive(byes[0].response(200))
    await asyncio.wait_for(hang_up, 1)
    assert handler.ends == ["hangup"] and host.forgotten == [dialog]
    await dialog.end("bye")  # ends once
    assert handler.ends == ["hangup"] and len(host.requests) == 1


async def test_a_cancel_before_the_answer_answers_the_invite_487_and_tells_no_handler(parts):
    host, handler, _, dialog = parts
    await dialog.end("cancel")
    assert host.responses == [(487, None, "agent-tag", None)] and host.forgotten == [dialog]
    assert host.requests == [] and handler.ends == []  # no BYE before a 2xx; offer() never succeeded


async def test_a_refused_offer_is_answered_through_the_host_and_the_dialog_forgets_itself(parts):
    host, handler, _, dialog = parts
    handler.refusal = CallRejected(486, "Busy Here")
    await dialog.answer(dialog.invite_tx, dialog.invite)
    assert host.responses == [(486, "Busy Here", "agent-tag", None)] and host.forgotten == [dialog]
    assert host.sent == [] and dialog.ended and handler.ends == []


async def test_a_missing_ack_is_reported_to_the_host_after_64_t1(parts):
    host, _, _, dialog = parts
    await dialog.answer(dialog.invite_tx, dialog.invite)
    await asyncio.sleep(64 * T1 + 0.3)
    assert host.no_ack == [dialog]
    assert len(host.sent) >= 4 and {m.status for m in host.messages()} == {200}  # T1 doubling to T2


async def test_a_reinvite_is_answered_through_the_host_and_refreshes_the_target(parts):
    host, handler, layer, dialog = parts
    await answered(host, dialog)
    reinvite = request("INVITE", 2, to_tag="agent-tag", contact="sip:caller@127.0.0.1:5099", body=SDP_OFFER)
    assert dialog.take_cseq(reinvite) and not dialog.take_cseq(reinvite)  # a second CSeq 2 is out of order
    dialog.begin_reinvite(reinvite)
    assert dialog.offer_pending
    await dialog.answer(invite_transaction(layer, reinvite), reinvite)
    ok = host.messages()[-1]
    assert (ok.status, ok.cseq.number, ok.body) == (200, 2, SDP_ANSWER)
    assert handler.offers[-1] == (SDP_OFFER, True) and dialog.offer_pending  # until the ACK
    assert dialog.acked(request("ACK", 2, to_tag="agent-tag")) and not dialog.offer_pending
    hang_up = await started(dialog.hang_up(), T1 / 2)
    bye = host.messages()[-1]
    assert bye.method == "BYE" and bye.uri == "sip:caller@127.0.0.1:5099"  # the new remote target
    host.requests[0].receive(bye.response(200))
    await asyncio.wait_for(hang_up, 1)


def test_the_dialog_module_does_not_import_the_server():
    code = "import sys, transports.sip.dialog; sys.exit('transports.sip.server' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
