"""SIP message parse/build (RFC 3261 §7, §8.2.6, §20), with datagrams shaped like SIPp captures."""

import random

import pytest

from transports.sip.message import (
    MAGIC_COOKIE,
    REASON_PHRASES,
    CSeq,
    NameAddr,
    SipMessage,
    SipParseError,
    SipRequest,
    SipResponse,
    SipUri,
    Via,
    new_branch,
    new_tag,
)

SDP = (
    b"v=0\r\n"
    b"o=user1 53655765 2353687637 IN IP4 127.0.0.1\r\n"
    b"s=-\r\n"
    b"c=IN IP4 127.0.0.1\r\n"
    b"t=0 0\r\n"
    b"m=audio 6000 RTP/AVP 0 101\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
    b"a=fmtp:101 0-15\r\n"
    b"a=ptime:20\r\n"
    b"a=sendrecv\r\n"
)

INVITE = (
    b"INVITE sip:agent@127.0.0.1:5060 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-4242-1-0\r\n"
    b'From: "caller" <sip:caller@127.0.0.1:5061>;tag=4242SIPpTag001\r\n'
    b"To: <sip:agent@127.0.0.1:5060>\r\n"
    b"Call-ID: 1-4242@127.0.0.1\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Contact: <sip:caller@127.0.0.1:5061>\r\n"
    b"Max-Forwards: 70\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: " + str(len(SDP)).encode() + b"\r\n"
    b"\r\n" + SDP
)

OPTIONS = (
    b"OPTIONS sip:agent@10.0.0.5 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bKopt77;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"To: <sip:agent@10.0.0.5>\r\n"
    b"From: <sip:probe@10.0.0.9>;tag=a73kszlfl\r\n"
    b"Call-ID: opt-1@10.0.0.9\r\n"
    b"CSeq: 63104 OPTIONS\r\n"
    b"Accept: application/sdp\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)

BYE = (
    b"BYE sip:agent@127.0.0.1:5060 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-4242-1-5\r\n"
    b'From: "caller" <sip:caller@127.0.0.1:5061>;tag=4242SIPpTag001\r\n'
    b"To: <sip:agent@127.0.0.1:5060>;tag=9fx1\r\n"
    b"Call-ID: 1-4242@127.0.0.1\r\n"
    b"CSeq: 2 BYE\r\n"
    b"Contact: <sip:caller@127.0.0.1:5061>\r\n"
    b"Max-Forwards: 70\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)

OK = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-4242-1-5;received=127.0.0.1;rport=5061\r\n"
    b'From: "caller" <sip:caller@127.0.0.1:5061>;tag=4242SIPpTag001\r\n'
    b"To: <sip:agent@127.0.0.1:5060>;tag=9fx1\r\n"
    b"Call-ID: 1-4242@127.0.0.1\r\n"
    b"CSeq: 2 BYE\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)


def semantics(message: SipMessage) -> tuple:
    start = (
        (message.method, message.uri) if isinstance(message, SipRequest) else (message.status, message.reason)
    )
    return start, [(n, v) for n, v in message.headers if n != "Content-Length"], message.body


# Parsing real-shaped messages ------------------------------------------------------------------


def test_invite_parses():
    invite = SipRequest.parse(INVITE)
    assert invite.method == "INVITE"
    assert invite.uri == "sip:agent@127.0.0.1:5060"
    assert invite.sip_uri == SipUri(host="127.0.0.1", user="agent", port=5060)
    assert invite.body == SDP
    assert invite.call_id == "1-4242@127.0.0.1"
    assert invite.cseq == CSeq(1, "INVITE")
    assert invite.from_.display_name == "caller"
    assert invite.from_.tag == "4242SIPpTag001"
    assert invite.from_.sip_uri.user == "caller"
    assert invite.to.tag is None
    assert invite.to.uri == "sip:agent@127.0.0.1:5060"
    assert invite.contact_uri == SipUri(host="127.0.0.1", user="caller", port=5061)
    assert invite.header("content-type") == "application/sdp"
    assert invite.header("MAX-FORWARDS") == "70"
    via = invite.via
    assert (via.transport, via.host, via.port, via.branch) == ("UDP", "127.0.0.1", 5061, "z9hG4bK-4242-1-0")
    assert not via.rport_requested


def test_options_bye_and_response_parse():
    options = SipMessage.parse(OPTIONS)
    assert isinstance(options, SipRequest) and options.method == "OPTIONS"
    assert options.via.rport_requested and options.via.rport is None
    assert options.body == b""
    bye = SipRequest.parse(BYE)
    assert bye.to.tag == "9fx1" and bye.cseq.method == "BYE"
    ok = SipResponse.parse(OK)
    assert (ok.status, ok.reason) == (200, "OK")
    assert ok.via.received == "127.0.0.1" and ok.via.rport == 5061


def test_kind_is_checked():
    with pytest.raises(SipParseError, match="expected a SipResponse"):
        SipResponse.parse(INVITE)
    with pytest.raises(SipParseError, match="expected a SipRequest"):
        SipRequest.parse(OK)


@pytest.mark.parametrize("data", [INVITE, OPTIONS, BYE, OK])
def test_round_trip_keeps_semantics(data):
    message = SipMessage.parse(data)
    again = SipMessage.parse(bytes(message))
    assert semantics(again) == semantics(message)
    assert bytes(again) == bytes(message)


def test_round_trip_is_byte_exact_for_plain_messages():
    assert bytes(SipMessage.parse(INVITE)) == INVITE
    assert bytes(SipMessage.parse(OK)) == OK


def test_content_length_is_always_written_correctly():
    invite = SipRequest.parse(INVITE)
    invite.body = b"v=0\r\n"
    assert b"Content-Length: 5\r\n\r\nv=0\r\n" in bytes(invite)
    invite.headers.remove("Content-Length")
    assert bytes(invite).endswith(b"Content-Length: 5\r\n\r\nv=0\r\n")


# §7.3: header forms -----------------------------------------------------------------------------


def test_compact_forms_expand():
    data = (
        b"INVITE sip:agent@127.0.0.1 SIP/2.0\r\n"
        b"v: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bKc1\r\n"
        b"f: <sip:caller@127.0.0.1>;tag=1\r\n"
        b"t: <sip:agent@127.0.0.1>\r\n"
        b"i: compact@127.0.0.1\r\n"
        b"CSeq: 1 INVITE\r\n"
        b"m: <sip:caller@127.0.0.1:5061>\r\n"
        b"c: application/sdp\r\n"
        b"k: timer, 100rel\r\n"
        b"s: hello\r\n"
        b"e: gzip\r\n"
        b"l: 3\r\n"
        b"\r\n"
        b"abcdef"
    )
    invite = SipRequest.parse(data)
    names = [name for name, _ in invite.headers]
    assert names == [
        "Via",
        "From",
        "To",
        "Call-ID",
        "CSeq",
        "Contact",
        "Content-Type",
        "Supported",
        "Supported",
        "Subject",
        "Content-Encoding",
        "Content-Length",
    ]
    assert invite.call_id == "compact@127.0.0.1"
    assert invite.headers_all("Supported") == ["timer", "100rel"]
    assert invite.body == b"abc"
    assert b"\r\nCall-ID: compact@127.0.0.1\r\n" in bytes(invite)


def test_folded_header_lines_are_unfolded():
    data = OPTIONS.replace(
        b"Accept: application/sdp\r\n", b"Subject: I know you're there,\r\n   pick up\r\n\tthe phone\r\n"
    )
    options = SipRequest.parse(data)
    assert options.header("subject") == "I know you're there, pick up the phone"


def test_multiple_via_keep_order_and_comma_values_split():
    data = INVITE.replace(
        b"Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-4242-1-0\r\n",
        b"Via: SIP/2.0/UDP proxy1.example.com;branch=z9hG4bKp1\r\n"
        b"Via: SIP/2.0/UDP proxy2.example.com:5070;branch=z9hG4bKp2 ,\r\n"
        b" SIP/2.0/TCP [2001:db8::9]:5062;branch=z9hG4bKp3;received=192.0.2.4\r\n"
        b"v: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-4242-1-0\r\n",
    )
    invite = SipRequest.parse(data)
    vias = invite.vias
    assert [v.branch for v in vias] == ["z9hG4bKp1", "z9hG4bKp2", "z9hG4bKp3", "z9hG4bK-4242-1-0"]
    assert (vias[1].host, vias[1].port) == ("proxy2.example.com", 5070)
    assert (vias[2].transport, vias[2].host, vias[2].port, vias[2].received) == (
        "TCP",
        "2001:db8::9",
        5062,
        "192.0.2.4",
    )
    assert invite.via.host == "proxy1.example.com"
    assert str(vias[2]) == "SIP/2.0/TCP [2001:db8::9]:5062;branch=z9hG4bKp3;received=192.0.2.4"
    assert bytes(invite).count(b"\r\nVia: ") == 4


def test_date_and_quoted_commas_are_not_split():
    data = OPTIONS.replace(
        b"Accept: application/sdp\r\n",
        b"Date: Sat, 13 Nov 2010 23:29:00 GMT\r\n"
        b'Contact: "Smith, John" <sip:js@10.0.0.9>;expires=60, <sip:js@10.0.0.10>\r\n',
    )
    options = SipRequest.parse(data)
    assert options.header("Date") == "Sat, 13 Nov 2010 23:29:00 GMT"
    contacts = options.contacts
    assert [c.display_name for c in contacts] == ["Smith, John", None]
    assert contacts[0].params == {"expires": "60"}
    assert options.contact_uri.user == "js"


def test_lf_only_line_endings_are_tolerated():
    options = SipRequest.parse(OPTIONS.replace(b"\r\n", b"\n"))
    assert options.cseq == CSeq(63104, "OPTIONS")


def test_leading_crlf_is_ignored():
    assert SipRequest.parse(b"\r\n\r\n" + OPTIONS).method == "OPTIONS"


# §18.3 / §20.14: Content-Length over UDP --------------------------------------------------------


def test_missing_content_length_takes_rest_of_datagram():
    invite = SipRequest.parse(INVITE.replace(b"Content-Length: " + str(len(SDP)).encode() + b"\r\n", b""))
    assert invite.body == SDP
    assert f"Content-Length: {len(SDP)}".encode() in bytes(invite)


def test_content_length_larger_than_datagram_is_an_error():
    with pytest.raises(SipParseError, match=f"Content-Length 400 but {len(SDP)} bytes of body"):
        SipRequest.parse(INVITE.replace(b"Content-Length: " + str(len(SDP)).encode(), b"Content-Length: 400"))


def test_content_length_smaller_truncates():
    invite = SipRequest.parse(
        INVITE.replace(b"Content-Length: " + str(len(SDP)).encode(), b"Content-Length: 5")
    )
    assert invite.body == b"v=0\r\n"


@pytest.mark.parametrize("value", [b"abc", b"-1", b"1 2", b"\xd9\xa3"])
def test_bad_content_length_value(value):
    with pytest.raises(SipParseError, match="Content-Length|UTF-8"):
        SipRequest.parse(OPTIONS.replace(b"Content-Length: 0", b"Content-Length: " + value))


# §8.2.6: responses built by the UAS -------------------------------------------------------------


def test_response_copies_headers_and_adds_to_tag():
    data = INVITE.replace(
        b"Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-4242-1-0\r\n",
        b"Via: SIP/2.0/UDP proxy.example.com;branch=z9hG4bKp1\r\nVia: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bKc\r\n",
    )
    invite = SipRequest.parse(data)
    ok = invite.response(
        200,
        to_tag="as83kd",
        headers=[("Contact", "<sip:agent@127.0.0.1:5060>"), ("Content-Type", "application/sdp")],
        body=SDP,
    )
    assert (ok.status, ok.reason) == (200, "OK")
    assert ok.headers_all("Via") == invite.headers_all("Via")
    assert ok.header("From") == invite.header("From")
    assert ok.header("Call-ID") == invite.header("Call-ID")
    assert ok.header("CSeq") == "1 INVITE"
    assert ok.to.tag == "as83kd" and ok.to.uri == invite.to.uri
    wire = bytes(ok)
    assert wire.startswith(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP proxy.example.com;branch=z9hG4bKp1\r\n")
    parsed = SipResponse.parse(wire)
    assert parsed.body == SDP and parsed.to.tag == "as83kd"
    assert parsed.header("Content-Length") == str(len(SDP))


def test_response_keeps_existing_to_tag_and_reason():
    bye = SipRequest.parse(BYE)
    ok = bye.response(200, to_tag="other")
    assert ok.to.tag == "9fx1"
    assert SipRequest.parse(INVITE).response(486, "Busy").reason == "Busy"
    assert SipRequest.parse(INVITE).response(180).to.tag is None


def test_trying_copies_timestamp():
    invite = SipRequest.parse(
        INVITE.replace(b"Max-Forwards: 70\r\n", b"Max-Forwards: 70\r\nTimestamp: 54\r\n")
    )
    assert invite.response(100).header("Timestamp") == "54"
    assert invite.response(200, to_tag="x").header("Timestamp") is None


def test_response_rejects_bad_status():
    with pytest.raises(ValueError):
        SipRequest.parse(INVITE).response(99)


def test_reason_phrases_cover_uas_codes():
    for code in (100, 180, 183, 200, 400, 403, 404, 405, 408, 415, 420, 481, 486, 487, 488, 500, 501, 503):
        assert REASON_PHRASES[code]
    assert REASON_PHRASES[481] == "Call/Transaction Does Not Exist"


def test_tags_and_branches():
    assert new_tag() != new_tag() and len(new_tag()) >= 8
    branch = new_branch()
    assert branch.startswith(MAGIC_COOKIE) and branch != new_branch()


# §19.1 and §20: URIs and structured headers -----------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "sip:agent@127.0.0.1:5060",
        "sip:127.0.0.1",
        "sip:alice:secret@example.com;transport=udp;lr",
        "sip:+15551234567;phone-context=example.com@gw.example.com;user=phone",
        "sip:bob@[2001:db8::1]:5062",
        "sip:bob@example.com?subject=hi",
        "sips:bob@example.com",
    ],
)
def test_sip_uri_round_trip(text):
    assert str(SipUri.parse(text)) == text


def test_sip_uri_fields():
    uri = SipUri.parse("SIP:+15551234567;phone-context=x@gw.example.com:5080;transport=UDP;lr")
    assert uri.scheme == "sip" and not uri.secure
    assert uri.user == "+15551234567;phone-context=x"
    assert (uri.host, uri.port) == ("gw.example.com", 5080)
    assert uri.params == {"transport": "UDP", "lr": None}
    assert SipUri.parse("sips:bob@example.com").secure


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tel:+15551234567", "scheme 'tel' is not supported"),
        ("agent@127.0.0.1", "no scheme"),
        ("sip:agent@127.0.0.1:99999", "port"),
        ("sip:agent@127.0.0.1:", "port"),
        ("sip:@host", "empty user"),
        ("sip:bob@[::1", "closing"),
        ("sip:", "bad host"),
    ],
)
def test_bad_uris(text, message):
    with pytest.raises(SipParseError, match=message):
        SipUri.parse(text)


def test_tel_request_uri_still_parses_for_a_416():
    invite = SipRequest.parse(INVITE.replace(b"INVITE sip:agent@127.0.0.1:5060", b"INVITE tel:+15551234567"))
    assert invite.uri == "tel:+15551234567"
    with pytest.raises(SipParseError, match="tel"):
        _ = invite.sip_uri
    assert invite.response(416).reason == "Unsupported URI Scheme"


def test_name_addr_forms():
    plain = NameAddr.parse("sip:bob@example.com;tag=88")
    assert (plain.uri, plain.tag, plain.display_name) == ("sip:bob@example.com", "88", None)
    token_name = NameAddr.parse("Bob Smith <sip:bob@example.com;transport=udp>;tag=1")
    assert token_name.display_name == "Bob Smith" and token_name.uri == "sip:bob@example.com;transport=udp"
    quoted = NameAddr.parse(r'"say \"hi\"" <sip:bob@example.com>')
    assert quoted.display_name == 'say "hi"'
    assert NameAddr.parse(str(quoted)) == quoted


def test_via_and_cseq_parse():
    via = Via.parse("SIP / 2.0 / udp host.example.com ; branch=z9hG4bKx ; rport")
    assert (via.transport, via.host, via.port, via.branch, via.rport_requested) == (
        "UDP",
        "host.example.com",
        None,
        "z9hG4bKx",
        True,
    )
    assert CSeq.parse("4711  INVITE") == CSeq(4711, "INVITE")
    with pytest.raises(SipParseError, match="CSeq"):
        CSeq.parse("INVITE 1")


# Malformed datagrams: always SipParseError, with a message that says what is wrong ---------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty datagram"),
        (b"\r\n\r\n", "empty datagram"),
        (INVITE.split(b"\r\n\r\n")[0], "no blank line"),
        (OPTIONS.replace(b"CSeq: 63104 OPTIONS\r\n", b""), "no CSeq header"),
        (OPTIONS.replace(b"Via: ", b"X-Via: "), "no Via header"),
        (OPTIONS.replace(b"CSeq: 63104 OPTIONS", b"CSeq: 1 INVITE"), "does not match"),
        (OPTIONS.replace(b"CSeq: 63104 OPTIONS", b"CSeq: x OPTIONS"), "CSeq"),
        (OPTIONS.replace(b"Call-ID: opt-1@10.0.0.9\r\n", b"Call-ID: a\r\ni: b\r\n"), "more than one Call-ID"),
        (
            OPTIONS.replace(b"OPTIONS sip:agent@10.0.0.5 SIP/2.0", b"FOO"),
            "request line 'FOO' has no SIP version",
        ),
        (OPTIONS.replace(b" SIP/2.0\r\n", b" SIP/3.0\r\n", 1), "is not SIP/2.0"),
        (
            OPTIONS.replace(b"sip:agent@10.0.0.5 ", b"sip:agent@10.0.0.5 x "),
            "is not 'Method Request-URI SIP/2.0'",
        ),
        (OPTIONS.replace(b"rport", b"rport=7x"), "port '7x'"),
        (OPTIONS.replace(b"OPTIONS sip:", b"OPT<>IONS sip:"), "not a token"),
        (OK.replace(b"200 OK", b"2x0 OK"), "three-digit status code"),
        (OK.replace(b"200 OK", b"OK"), "three-digit status code"),
        (OPTIONS.replace(b"Max-Forwards: 70", b"Max-Forwards 70"), "is not 'Name: value'"),
        (OPTIONS.replace(b"Via: SIP/2.0/UDP 10.0.0.9:5060", b"Via: SIP/2.0/UDP"), "Via"),
        (OPTIONS.replace(b"From: <sip:probe@10.0.0.9>", b"From: <sip:probe@10.0.0.9"), "no closing '>'"),
        (
            OPTIONS.replace(b"To: <sip:agent@10.0.0.5>", b'To: "agent <sip:agent@10.0.0.5>'),
            "no closing quote",
        ),
        (b" continued\r\n" + OPTIONS, "request line"),
        (OPTIONS.replace(b"Max-Forwards: 70", b"Max-Forwards: \xff\xfe70"), "not UTF-8"),
        (bytes(range(256)) * 4 + b"\r\n\r\n", "UTF-8"),
        (b"\x00\x01\x02\x03\x04\r\n\r\n", "request line"),
    ],
)
def test_malformed_datagrams(data, message):
    with pytest.raises(SipParseError, match=message):
        SipMessage.parse(data)


def test_garbage_never_raises_anything_else():
    rng = random.Random(3261)
    for _ in range(200):
        junk = rng.randbytes(rng.randrange(0, 300))
        try:
            SipMessage.parse(junk)
        except SipParseError:
            pass


def test_fuzzed_invite_raises_only_sip_parse_error():
    rng = random.Random(20250101)
    corpus = bytearray(INVITE)
    interesting = b'\r\n\t :;,<>"@[]=/\xff\x00SIP0123456789'
    parsed = 0
    for _ in range(500):
        data = bytearray(corpus)
        for _ in range(rng.randrange(1, 6)):
            kind = rng.randrange(4)
            pos = rng.randrange(len(data))
            if kind == 0:
                data[pos] = rng.randrange(256)
            elif kind == 1:
                data[pos] = rng.choice(interesting)
            elif kind == 2:
                del data[pos : pos + rng.randrange(1, 8)]
            else:
                data[pos:pos] = bytes(rng.choice(interesting) for _ in range(rng.randrange(1, 4)))
        try:
            message = SipMessage.parse(bytes(data))
        except SipParseError as exc:
            assert str(exc)
            continue
        parsed += 1
        # Whatever parsed must also serialise and parse back the same.
        assert semantics(SipMessage.parse(bytes(message))) == semantics(message)
    assert 0 < parsed < 500
