"""The SIP user agent server (RFC 3261) against a plain UDP socket that plays the caller, with
hand-written requests, a recording call handler and a short T1 so the timers run in real time."""

import asyncio
import itertools

import pytest
from loguru import logger

from transports.sip.auth import AllowList, DigestAuthenticator, digest_response, parse_digest_credentials
from transports.sip.message import SipMessage, SipRequest, SipResponse
from transports.sip.sdp import negotiate
from transports.sip.server import CallRejected, SipServer

FAST = {"t1": 0.02, "t2": 0.08, "t4": 0.1}  # 64*T1 = 1.28 s
WAIT = 2.0  # bound on any single receive


def sdp(direction: str = "sendrecv", host: str = "127.0.0.1", codecs: str = "0 101") -> bytes:
    return (
        "v=0\r\no=caller 1 1 IN IP4 127.0.0.1\r\ns=-\r\n"
        f"c=IN IP4 {host}\r\nt=0 0\r\nm=audio 6000 RTP/AVP {codecs}\r\n"
        "a=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
        f"a=ptime:20\r\na={direction}\r\n"
    ).encode()


class Handler:
    """Records offer/start/end and answers with `sdp.negotiate`, as the real handler does."""

    def __init__(self):
        self.events: list[tuple] = []
        self.answers = {}
        self.delay = 0.0
        self.error: Exception | None = None
        self.ended = asyncio.Event()
        self.started = asyncio.Event()

    async def offer(self, dialog, offer: bytes) -> bytes:
        self.events.append(("offer", dialog.call_id, dialog.confirmed))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        answer = negotiate(
            offer, local_ip="127.0.0.1", local_port=40000, previous=self.answers.get(dialog.call_id)
        )
        self.answers[dialog.call_id] = answer
        return answer.sdp.encode()

    async def start(self, dialog) -> None:
        self.events.append(("start", dialog.call_id))
        self.started.set()

    async def end(self, dialog, reason: str) -> None:
        self.events.append(("end", dialog.call_id, reason))
        self.ended.set()


class Caller(asyncio.DatagramProtocol):
    """The far end: sends raw datagrams, queues what comes back."""

    def __init__(self):
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.port = 0
        self.server: tuple[str, int] = ("127.0.0.1", 0)
        self.cseq = itertools.count(1)

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.inbox.put_nowait(data)

    def send(self, data: bytes) -> None:
        self.transport.sendto(data, self.server)

    async def recv(self, timeout: float = WAIT) -> SipRequest | SipResponse:
        return SipMessage.parse(await asyncio.wait_for(self.inbox.get(), timeout))

    async def final(self, method: str = "INVITE") -> SipResponse:
        """The next final response to `method`, skipping provisionals."""
        while True:
            message = await self.recv()
            if isinstance(message, SipResponse) and message.cseq.method == method and message.status >= 200:
                return message

    async def silent(self, seconds: float = 0.3) -> None:
        with pytest.raises(TimeoutError):
            data = await asyncio.wait_for(self.inbox.get(), seconds)
            pytest.fail(f"expected silence, got {data[:60]!r}")

    def request(self, method, call_id="call-1", *, cseq=None, branch=None, to_tag=None, body=b"", extra=""):
        cseq = next(self.cseq) if cseq is None else cseq
        branch = branch or f"z9hG4bK-{call_id}-{cseq}-{method}"
        to = "<sip:agent@127.0.0.1>" + (f";tag={to_tag}" if to_tag else "")
        head = (
            f"{method} sip:agent@127.0.0.1:{self.server[1]} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch={branch}\r\n"
            f"From: <sip:caller@127.0.0.1>;tag=caller-{call_id}\r\nTo: {to}\r\n"
            f"Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n"
            f"Contact: <sip:caller@127.0.0.1:{self.port}>\r\nMax-Forwards: 70\r\n{extra}"
        )
        if body:
            head += "Content-Type: application/sdp\r\n"
        return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body

    async def answer_byes(self) -> None:
        """Answer the BYEs a stopping server sends, so teardown does not wait out Timer F."""
        while True:
            message = SipMessage.parse(await self.inbox.get())
            if isinstance(message, SipRequest) and message.method == "BYE":
                self.send(bytes(message.response(200)))

    async def call(self, call_id="call-1", *, ack=True) -> SipResponse:
        cseq = next(self.cseq)
        self.send(self.request("INVITE", call_id, cseq=cseq, body=sdp()))
        ok = await self.final()
        assert ok.status == 200, ok
        if ack:
            self.send(self.request("ACK", call_id, cseq=cseq, to_tag=ok.to.tag))
        return ok


@pytest.fixture
async def setup(request):
    options = getattr(request, "param", {})
    handler = Handler()
    server = SipServer(handler, host="127.0.0.1", port=0, **{**FAST, **options})
    await server.start()
    loop = asyncio.get_running_loop()
    transport, caller = await loop.create_datagram_endpoint(Caller, local_addr=("127.0.0.1", 0))
    caller.port = transport.get_extra_info("sockname")[1]
    caller.server = ("127.0.0.1", server.port)
    yield server, handler, caller
    answering = asyncio.create_task(caller.answer_byes())
    await server.stop()
    answering.cancel()
    transport.close()


def answer_to(request: SipRequest, status: int = 200) -> bytes:
    return bytes(request.response(status, to_tag=None))


async def test_full_call_invite_ringing_ok_ack_bye(setup):
    server, handler, caller = setup
    caller.send(caller.request("INVITE", body=sdp()))
    trying, ringing, ok = await caller.recv(), await caller.recv(), await caller.final()
    assert (trying.status, ringing.status, ok.status) == (100, 180, 200)
    assert trying.to.tag is None and ringing.to.tag == ok.to.tag and ok.to.tag
    assert ok.header("Content-Type") == "application/sdp"
    assert b"m=audio 40000 RTP/AVP 0 101" in ok.body
    assert ok.contact_uri.port == server.port and "BYE" in ok.headers_all("Allow")
    caller.send(caller.request("ACK", cseq=1, to_tag=ok.to.tag))
    await asyncio.wait_for(handler.started.wait(), WAIT)
    assert server.dialogs["call-1"].confirmed
    caller.send(caller.request("BYE", to_tag=ok.to.tag))
    assert (await caller.final("BYE")).status == 200
    await asyncio.wait_for(handler.ended.wait(), WAIT)
    assert handler.events == [("offer", "call-1", False), ("start", "call-1"), ("end", "call-1", "bye")]
    assert server.dialogs == {}


async def test_2xx_is_retransmitted_until_the_ack(setup):
    server, handler, caller = setup
    ok = await caller.call(ack=False)
    again = await caller.final()  # T1 later, the same 2xx
    assert again.status == 200 and again.to.tag == ok.to.tag
    caller.send(caller.request("ACK", cseq=1, to_tag=ok.to.tag))
    await asyncio.wait_for(handler.started.wait(), WAIT)
    while not caller.inbox.empty():  # one may have crossed the ACK
        caller.inbox.get_nowait()
    await caller.silent(0.4)


async def test_no_ack_sends_bye_and_ends_with_no_ack(setup):
    server, handler, caller = setup
    await caller.call(ack=False)
    while not isinstance(message := await caller.recv(), SipRequest):
        assert message.status == 200
    assert message.method == "BYE"
    caller.send(answer_to(message))
    await asyncio.wait_for(handler.ended.wait(), WAIT)
    assert handler.events[-1] == ("end", "call-1", "no_ack")
    assert ("start", "call-1") not in handler.events


@pytest.mark.parametrize("setup", [{"t1": 0.5}], indirect=True)
async def test_retransmitted_invite_after_2xx_gets_the_2xx_again(setup):
    server, handler, caller = setup
    ok = await caller.call(ack=False)
    caller.send(caller.request("INVITE", cseq=1, body=sdp()))
    again = await asyncio.wait_for(caller.final(), 0.3)  # well before the T1 retransmission
    assert again.to.tag == ok.to.tag
    assert [e for e in handler.events if e[0] == "offer"] == [("offer", "call-1", False)]


async def test_cancel_before_answer_gives_487_and_ends_with_cancel(setup):
    server, handler, caller = setup
    handler.delay = 0.3
    caller.send(caller.request("INVITE", cseq=1, body=sdp()))
    assert (await caller.recv()).status == 100
    assert (await caller.recv()).status == 180
    caller.send(caller.request("CANCEL", cseq=1, branch="z9hG4bK-call-1-1-INVITE"))
    assert (await caller.final("CANCEL")).status == 200
    assert (await caller.final("INVITE")).status == 487
    await asyncio.wait_for(handler.ended.wait(), WAIT)
    assert handler.events[-1] == ("end", "call-1", "cancel")
    assert server.dialogs == {}


async def test_cancel_or_bye_for_no_call_is_481(setup):
    server, handler, caller = setup
    caller.send(caller.request("CANCEL", "nothing"))
    assert (await caller.final("CANCEL")).status == 481
    caller.send(caller.request("BYE", "nothing", to_tag="abc"))
    assert (await caller.final("BYE")).status == 481


async def test_hang_up_sends_bye_until_answered_then_ends_with_hangup(setup):
    server, handler, caller = setup
    ok = await caller.call()
    await asyncio.wait_for(handler.started.wait(), WAIT)
    hang_up = asyncio.create_task(server.dialogs["call-1"].hang_up())
    first, second = await caller.recv(), await caller.recv()
    assert first.method == second.method == "BYE"
    assert first.via.branch == second.via.branch  # a retransmission, not a new request
    assert first.to.tag == "caller-call-1" and first.from_.tag == ok.to.tag
    assert first.uri == f"sip:caller@127.0.0.1:{caller.port}"
    assert not hang_up.done()
    caller.send(answer_to(first))
    await asyncio.wait_for(hang_up, WAIT)
    assert handler.events[-1] == ("end", "call-1", "hangup")
    assert server.dialogs == {}


@pytest.mark.parametrize(
    "target, refer_to",
    [
        ("sip:human@example.com", "<sip:human@example.com>"),
        # a phone number is named at the caller's domain (the From's host), where the trunk routes it
        ("+15550100200", "<sip:+15550100200@127.0.0.1;user=phone>"),
    ],
)
async def test_refer_sends_refer_to_and_reports_2xx(setup, target, refer_to):
    server, handler, caller = setup
    await caller.call()
    await asyncio.wait_for(handler.started.wait(), WAIT)
    refer = asyncio.create_task(server.dialogs["call-1"].refer(target))
    request = await caller.recv()
    assert request.method == "REFER" and request.header("Refer-To") == refer_to
    caller.send(answer_to(request, 202))
    assert await asyncio.wait_for(refer, WAIT) is True


async def test_options_answered_with_allow_and_accept(setup):
    server, handler, caller = setup
    caller.send(caller.request("OPTIONS", "ping"))
    response = await caller.final("OPTIONS")
    assert response.status == 200
    assert response.header("Accept") == "application/sdp"
    assert {"INVITE", "BYE", "CANCEL", "OPTIONS"} <= set(response.headers_all("Allow"))


async def test_reinvite_hold_and_resume(setup):
    server, handler, caller = setup
    ok = await caller.call()
    tag = ok.to.tag
    caller.send(caller.request("INVITE", cseq=2, to_tag=tag, body=sdp("sendonly")))
    held = await caller.final()
    assert held.status == 200 and b"a=recvonly" in held.body
    caller.send(caller.request("ACK", cseq=2, to_tag=tag))
    caller.send(caller.request("INVITE", cseq=3, to_tag=tag, body=sdp("sendrecv")))
    resumed = await caller.final()
    assert resumed.status == 200 and b"a=sendrecv" in resumed.body
    caller.send(caller.request("ACK", cseq=3, to_tag=tag))
    assert [e for e in handler.events if e[0] == "offer"][1:] == [("offer", "call-1", True)] * 2
    assert server.dialogs["call-1"].confirmed and not handler.ended.is_set()


async def test_reinvite_while_one_is_pending_is_491(setup):
    server, handler, caller = setup
    ok = await caller.call()
    handler.delay = 0.3
    caller.send(caller.request("INVITE", cseq=2, to_tag=ok.to.tag, body=sdp("sendonly")))
    caller.send(caller.request("INVITE", cseq=3, to_tag=ok.to.tag, body=sdp("sendrecv")))
    finals = [await caller.final()]
    while finals[-1].status != 200:  # the 491 is retransmitted until its ACK
        finals.append(await caller.final())
    assert (finals[0].status, finals[0].cseq.number) == (491, 3)
    assert finals[-1].cseq.number == 2


@pytest.mark.parametrize("setup", [{"max_calls": 1}], indirect=True)
async def test_busy_at_capacity(setup):
    server, handler, caller = setup
    await caller.call("call-1")
    caller.send(caller.request("INVITE", "call-2", body=sdp()))
    assert (await caller.final()).status == 486
    assert list(server.dialogs) == ["call-1"]


@pytest.mark.parametrize("setup", [{"allow": AllowList(["10.0.0.0/8"])}], indirect=True)
async def test_source_not_on_allow_list_is_403(setup):
    server, handler, caller = setup
    caller.send(caller.request("INVITE", body=sdp()))
    assert (await caller.final()).status == 403
    assert handler.events == [] and server.counts["forbidden"] == 1


@pytest.mark.parametrize(
    "setup", [{"auth": DigestAuthenticator("agents", {"trunk": "s3cret"})}], indirect=True
)
async def test_digest_challenge_then_call(setup):
    server, handler, caller = setup
    caller.send(caller.request("INVITE", cseq=1, body=sdp()))
    challenge = await caller.final()
    assert challenge.status == 401 and handler.events == []
    caller.send(caller.request("ACK", cseq=1, branch="z9hG4bK-call-1-1-INVITE", to_tag=challenge.to.tag))
    params = parse_digest_credentials(challenge.header("WWW-Authenticate"))
    uri = f"sip:agent@127.0.0.1:{server.port}"
    digest = digest_response(
        "MD5", "trunk", "agents", "s3cret", "INVITE", uri, params["nonce"], "00000001", "c0", "auth"
    )
    authorization = (
        f'Authorization: Digest username="trunk", realm="agents", nonce="{params["nonce"]}", uri="{uri}", '
        f'response="{digest}", algorithm=MD5, qop=auth, nc=00000001, cnonce="c0"\r\n'
    )
    caller.send(caller.request("INVITE", cseq=2, body=sdp(), extra=authorization))
    assert (await caller.final()).status == 200
    wrong = authorization.replace(digest, "0" * 32)
    caller.send(caller.request("INVITE", "call-2", cseq=1, body=sdp(), extra=wrong))
    assert (await caller.final()).status == 401


@pytest.mark.parametrize(
    ("error", "status"),
    [(CallRejected(503, "Agent Busy"), 503), (RuntimeError("boom"), 500)],
)
async def test_handler_refusal_or_failure_is_the_final_response(setup, error, status):
    server, handler, caller = setup
    handler.error = error
    caller.send(caller.request("INVITE", body=sdp()))
    assert (await caller.final()).status == status
    assert server.dialogs == {} and not handler.ended.is_set()


async def test_offer_without_a_common_codec_is_488(setup):
    server, handler, caller = setup
    caller.send(caller.request("INVITE", body=sdp(codecs="18")))
    assert (await caller.final()).status == 488
    caller.send(caller.request("INVITE", "call-2"))  # no SDP at all
    assert (await caller.final()).status == 488


async def test_in_dialog_info_is_200_and_wrong_tags_are_481(setup):
    server, handler, caller = setup
    ok = await caller.call()
    dtmf = b"Signal=5\r\nDuration=160\r\n"
    info = caller.request("INFO", to_tag=ok.to.tag, extra="Content-Type: application/dtmf-relay\r\n")
    caller.send(info.replace(b"Content-Length: 0\r\n\r\n", b"Content-Length: %d\r\n\r\n" % len(dtmf)) + dtmf)
    assert (await caller.final("INFO")).status == 200
    caller.send(caller.request("INVITE", to_tag="not-ours", body=sdp("sendonly")))
    assert (await caller.final()).status == 481
    caller.send(caller.request("INFO", "other-call"))
    assert (await caller.final("INFO")).status == 481
    assert server.dialogs["call-1"].confirmed and not handler.ended.is_set()


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ((b"Content-Type: application/sdp", b"Content-Type: text/plain"), 415),
        ((b"Max-Forwards: 70", b"Require: 100rel\r\nMax-Forwards: 70"), 420),
        ((b"INVITE sip:agent@", b"INVITE sips:agent@"), 416),
        ((b"Contact: <sip:caller@127.0.0.1", b"X-Contact: <sip:caller@127.0.0.1"), 400),
    ],
)
async def test_invites_we_cannot_take_get_the_rfc_status(setup, change, status):
    server, handler, caller = setup
    caller.send(caller.request("INVITE", body=sdp()).replace(*change))
    response = await caller.final()
    assert response.status == status
    if status == 420:
        assert response.header("Unsupported") == "100rel"
    assert handler.events == [] and server.dialogs == {}


GOOD_OPTIONS = (
    b"OPTIONS sip:agent@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-x{n}\r\n"
    b"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:agent@127.0.0.1>\r\nCall-ID: m{n}\r\nCSeq: 1 OPTIONS\r\n"
)


@pytest.mark.parametrize(
    ("name", "data", "status", "reason_has"),
    [
        ("truncated headers", GOOD_OPTIONS[:120], None, None),
        ("garbage bytes", bytes(range(256)) * 3, None, None),
        ("bad Content-Length", GOOD_OPTIONS + b"Content-Length: 500\r\n\r\nv=0", 400, "Content-Length"),
        ("non-numeric Content-Length", GOOD_OPTIONS + b"Content-Length: ten\r\n\r\n", 400, "Content-Length"),
        ("missing Call-ID", GOOD_OPTIONS.replace(b"Call-ID: m{n}\r\n", b"") + b"\r\n", None, None),
        ("unknown method", GOOD_OPTIONS.replace(b"OPTIONS", b"FROB") + b"\r\n", 501, "FROB"),
        ("known, not allowed", GOOD_OPTIONS.replace(b"OPTIONS", b"REGISTER") + b"\r\n", 405, None),
        ("keep-alive", b"\r\n\r\n", None, None),
    ],
)
async def test_malformed_input_is_answered_or_dropped_and_the_server_goes_on(
    setup, name, data, status, reason_has
):
    server, handler, caller = setup
    caller.send(data.replace(b"{port}", str(caller.port).encode()).replace(b"{n}", b"1"))
    if status is None:
        await caller.silent(0.2)
        assert sum(server.counts.values()) == 1
    else:
        response = await caller.recv()
        assert response.status == status
        assert reason_has is None or reason_has in response.reason
    healthy = GOOD_OPTIONS.replace(b"{port}", str(caller.port).encode()).replace(b"{n}", b"2") + b"\r\n"
    caller.send(healthy)
    assert (await caller.final("OPTIONS")).status == 200
    assert server.counts["internal_error"] == 0


async def test_repeated_garbage_is_counted_each_time_and_logged_once(setup):
    server, handler, caller = setup
    warnings = []
    sink = logger.add(lambda message: warnings.append(message), level="WARNING")
    try:
        for _ in range(3):
            caller.send(b"\x16\x03\x01 not SIP at all")
        caller.send(caller.request("OPTIONS", "after"))
        assert (await caller.final("OPTIONS")).status == 200
    finally:
        logger.remove(sink)
    assert server.counts["unparseable"] == 3
    assert len([w for w in warnings if "dropped a datagram" in w]) == 1


async def test_stop_hangs_up_every_call_with_shutdown(setup):
    server, handler, caller = setup
    await caller.call()
    await asyncio.wait_for(handler.started.wait(), WAIT)
    stopping = asyncio.create_task(server.stop())
    bye = await caller.recv()
    assert bye.method == "BYE"
    caller.send(answer_to(bye))
    await asyncio.wait_for(stopping, WAIT + 3)
    assert handler.events[-1] == ("end", "call-1", "shutdown")


# Refusals counted by reason, capacity that a dispatcher can see, offers we cannot send media to ----------


def bad_offer(change: tuple[str, str]) -> bytes:
    return sdp().replace(change[0].encode(), change[1].encode())


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (("m=audio 6000", "m=audio 70000"), "port 70000 is out of range"),
        (("m=audio 6000", "m=audio six"), "port 'six' is not a port number"),
        (("c=IN IP4 127.0.0.1", "c=IN IP4 999.999.1.1"), "not an IP4 address literal"),
        (("c=IN IP4 127.0.0.1", "c=IN IP4 media.example.com"), "not an IP4 address literal"),
    ],
)
async def test_an_offer_we_cannot_send_media_to_is_488_naming_why_and_never_answered(setup, change, named):
    server, handler, caller = setup
    refusals = []
    server.on_refusal = refusals.append
    caller.send(caller.request("INVITE", body=bad_offer(change)))
    response = await caller.final()
    assert response.status == 488 and named in response.reason
    assert server.dialogs == {} and not handler.ended.is_set()
    assert refusals == ["bad_sdp"]


async def test_refusals_are_reported_by_reason(setup):
    server, handler, caller = setup
    refusals = []
    server.on_refusal = refusals.append
    caller.send(caller.request("INVITE", "c1", body=sdp(codecs="18")))  # no common codec
    assert (await caller.final()).status == 488
    caller.send(caller.request("INVITE", "c2").replace(b"Contact: ", b"X-Contact: "))
    assert (await caller.final()).status == 400
    caller.send(caller.request("INVITE", "c3", body=sdp()).replace(b"application/sdp", b"text/plain"))
    assert (await caller.final()).status == 415
    caller.send(GOOD_OPTIONS.replace(b"{port}", str(caller.port).encode()).replace(b"{n}", b"9") + b"Content-Length: x\r\n\r\n")
    assert (await caller.recv()).status == 400
    server.allow = AllowList(["10.0.0.0/8"])
    caller.send(caller.request("INVITE", "c4", body=sdp()))
    assert (await caller.final()).status == 403
    assert refusals == ["bad_sdp", "bad_request", "unsupported_media_type", "bad_request", "forbidden"]


async def test_a_call_awaiting_its_ack_is_counted_then_the_no_ack_timeout_reported(setup):
    server, handler, caller = setup
    refusals = []
    server.on_refusal = refusals.append
    assert server.awaiting_ack == 0
    await caller.call(ack=False)
    assert server.awaiting_ack == 1 and len(server.dialogs) == 1
    while not isinstance(message := await caller.recv(), SipRequest):  # 64*T1 later: BYE
        pass
    caller.send(answer_to(message))
    await asyncio.wait_for(handler.ended.wait(), WAIT)
    assert server.awaiting_ack == 0 and refusals == ["no_ack"]


@pytest.mark.parametrize("setup", [{"max_calls": 1}], indirect=True)
async def test_a_call_awaiting_its_ack_holds_a_slot_so_the_next_is_busy(setup):
    server, handler, caller = setup
    await caller.call("call-1", ack=False)
    caller.send(caller.request("INVITE", "call-2", body=sdp()))
    busy = await caller.final()
    assert (busy.status, busy.call_id) == (486, "call-2") and "max_calls 1" in busy.reason


async def test_when_the_application_is_busy_invites_get_486_and_options_503(setup):
    server, handler, caller = setup
    refusals = []
    server.on_refusal = refusals.append
    reason = "engine behind real time"
    server.busy = lambda: reason
    caller.send(caller.request("OPTIONS", "probe-1"))
    probe = await caller.final("OPTIONS")
    assert probe.status == 503 and reason in probe.reason
    caller.send(caller.request("INVITE", "call-1", body=sdp()))
    busy = await caller.final()
    assert busy.status == 486 and reason in busy.reason
    assert handler.events == [] and server.dialogs == {}
    reason = None  # caught up: a dispatcher's next probe puts this server back in rotation
    caller.send(caller.request("OPTIONS", "probe-2"))
    assert (await caller.final("OPTIONS")).status == 200
    assert refusals == ["busy"]  # the probes are not refusals of calls
