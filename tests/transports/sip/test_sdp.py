"""SDP offer/answer (RFC 3264) for the SIP phone media line."""

import pytest
from aiortc.sdp import SessionDescription

from transports.sip.sdp import Answer, Codec, SdpError, negotiate


def sdp(*lines: str) -> str:
    return "\r\n".join(lines) + "\r\n"


# SIPp's uac_pcmu.xml offer (telephony-facts section 3.2), with its placeholders filled in.
SIPP_OFFER = sdp(
    "v=0",
    "o=user1 53655765 2353687637 IN IP4 127.0.0.1",
    "s=-",
    "c=IN IP4 127.0.0.1",
    "t=0 0",
    "m=audio 6000 RTP/AVP 0 101",
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:101 telephone-event/8000",
    "a=fmtp:101 0-15",
    "a=ptime:20",
    "a=sendrecv",
)

# Carrier-style offer: static types without rtpmap, G729 with an fmtp but no rtpmap.
CARRIER_OFFER = sdp(
    "v=0",
    "o=root 1899531925 1899531925 IN IP4 54.172.60.1",
    "s=Twilio Media Gateway",
    "c=IN IP4 54.172.60.1",
    "t=0 0",
    "m=audio 17958 RTP/AVP 0 8 18 101",
    "a=rtpmap:101 telephone-event/8000",
    "a=fmtp:18 annexb=no",
    "a=fmtp:101 0-16",
    "a=ptime:20",
    "a=maxptime:150",
    "a=sendrecv",
)

# baresip-like offer: Opus first, G.711 A-law before mu-law, rtcp-mux, telephone-event on PT 101.
BARESIP_OFFER = sdp(
    "v=0",
    "o=- 1433164395 3107891604 IN IP4 192.168.1.20",
    "s=-",
    "c=IN IP4 192.168.1.20",
    "t=0 0",
    "m=audio 10318 RTP/AVP 96 9 8 0 101",
    "b=AS:96",
    "a=rtpmap:96 opus/48000/2",
    "a=fmtp:96 stereo=1;sprop-stereo=1",
    "a=rtpmap:9 G722/8000",
    "a=rtpmap:8 PCMA/8000",
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:101 telephone-event/8000",
    "a=fmtp:101 0-15",
    "a=rtcp-mux",
    "a=sendrecv",
    "a=label:1",
)


def offer_with(direction: str = "sendrecv", host: str = "10.0.0.5", port: int = 4000) -> str:
    return sdp(
        "v=0",
        "o=alice 100 200 IN IP4 10.0.0.5",
        "s=-",
        f"c=IN IP4 {host}",
        "t=0 0",
        f"m=audio {port} RTP/AVP 0 101",
        "a=rtpmap:101 telephone-event/8000",
        f"a={direction}",
    )


def answer(offer: str | bytes, **kwargs) -> Answer:
    kwargs.setdefault("local_ip", "192.0.2.10")
    kwargs.setdefault("local_port", 20000)
    return negotiate(offer, **kwargs)


def parse_back(result: Answer) -> SessionDescription:
    parsed = SessionDescription.parse(result.sdp)
    assert [m.kind for m in parsed.media].count("audio") == 1
    return parsed


def test_sipp_offer_gives_pcmu_and_telephone_event() -> None:
    result = answer(SIPP_OFFER.encode(), session_id=42)
    assert result.codec == Codec("PCMU", 0, 8000)
    assert result.telephone_event_pt == 101
    assert (result.remote_host, result.remote_port) == ("127.0.0.1", 6000)
    assert (result.remote_direction, result.direction, result.ptime) == ("sendrecv", "sendrecv", 20)
    assert result.sdp == sdp(
        "v=0",
        "o=- 42 42 IN IP4 192.0.2.10",
        "s=-",
        "c=IN IP4 192.0.2.10",
        "t=0 0",
        "m=audio 20000 RTP/AVP 0 101",
        "a=sendrecv",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-16",
        "a=ptime:20",
    )
    audio = parse_back(result).media[0]
    assert (audio.port, audio.profile, audio.fmt) == (20000, "RTP/AVP", [0, 101])


def test_carrier_offer_with_static_types_and_fmtp_without_rtpmap() -> None:
    result = answer(CARRIER_OFFER)
    assert result.codec == Codec("PCMU", 0)
    assert result.telephone_event_pt == 101
    assert result.remote_port == 17958
    assert parse_back(result).media[0].fmt == [0, 101]


def test_offer_order_wins_among_codecs_we_accept() -> None:
    result = answer(BARESIP_OFFER)
    assert result.codec == Codec("PCMA", 8)
    assert parse_back(result).media[0].fmt == [8, 101]
    assert answer(BARESIP_OFFER, codecs=("PCMU",)).codec == Codec("PCMU", 0)


def test_telephone_event_keeps_the_offered_payload_type() -> None:
    offer = (
        SIPP_OFFER.replace(" 0 101", " 0 96")
        .replace("rtpmap:101", "rtpmap:96")
        .replace("fmtp:101", "fmtp:96")
    )
    result = answer(offer)
    assert result.telephone_event_pt == 96
    assert "a=fmtp:96 0-16\r\n" in result.sdp


def test_no_telephone_event_when_not_offered() -> None:
    result = answer(
        sdp("v=0", "o=- 1 1 IN IP4 10.0.0.1", "s=-", "c=IN IP4 10.0.0.1", "t=0 0", "m=audio 5004 RTP/AVP 8")
    )
    assert result.codec == Codec("PCMA", 8)
    assert result.telephone_event_pt is None
    assert "telephone-event" not in result.sdp
    assert parse_back(result).media[0].fmt == [8]


def test_no_common_codec_names_what_was_offered() -> None:
    offer = sdp(
        "v=0",
        "o=- 1 1 IN IP4 10.0.0.1",
        "s=-",
        "c=IN IP4 10.0.0.1",
        "t=0 0",
        "m=audio 5004 RTP/AVP 9 18 101",
        "a=rtpmap:9 G722/8000",
        "a=rtpmap:18 G729/8000",
        "a=rtpmap:101 telephone-event/8000",
    )
    with pytest.raises(SdpError, match=r"offered G722, G729; we accept PCMU, PCMA"):
        answer(offer)


def test_media_level_connection_wins_over_session_level() -> None:
    offer = SIPP_OFFER.replace("a=ptime:20", "c=IN IP4 203.0.113.7\r\na=ptime:20")
    assert answer(offer).remote_host == "203.0.113.7"
    assert answer(SIPP_OFFER).remote_host == "127.0.0.1"


def test_ipv6_connection_address() -> None:
    result = answer(SIPP_OFFER.replace("c=IN IP4 127.0.0.1", "c=IN IP6 2001:db8::1"), local_ip="2001:db8::2")
    assert result.remote_host == "2001:db8::1"
    assert "c=IN IP6 2001:db8::2\r\n" in result.sdp
    assert "o=- " in result.sdp and " IN IP6 2001:db8::2\r\n" in result.sdp


def test_offered_ptime_is_respected() -> None:
    result = answer(SIPP_OFFER.replace("a=ptime:20", "a=ptime:30"))
    assert result.ptime == 30
    assert "a=ptime:30\r\n" in result.sdp
    without = SIPP_OFFER.replace("a=ptime:20\r\n", "")
    assert answer(without).ptime == 20
    assert answer(without, ptime=40).ptime == 40


@pytest.mark.parametrize(
    ("offered", "remote", "ours"),
    [
        ("sendrecv", "sendrecv", "sendrecv"),
        ("sendonly", "sendonly", "recvonly"),
        ("recvonly", "recvonly", "sendonly"),
        ("inactive", "inactive", "inactive"),
    ],
)
def test_direction_mapping(offered: str, remote: str, ours: str) -> None:
    result = answer(offer_with(offered))
    assert (result.remote_direction, result.direction) == (remote, ours)
    assert parse_back(result).media[0].direction == ours


def test_session_level_direction_applies_to_media() -> None:
    offer = offer_with("sendrecv").replace("a=sendrecv\r\n", "").replace("t=0 0", "t=0 0\r\na=sendonly")
    assert answer(offer).direction == "recvonly"


def test_hold_with_null_address() -> None:
    result = answer(offer_with("sendrecv", host="0.0.0.0"))
    assert result.on_hold and not result.sending and result.receiving
    assert result.direction == "recvonly"
    assert answer(offer_with("inactive", host="0.0.0.0")).direction == "inactive"


def test_hold_and_resume_increment_our_version() -> None:
    first = answer(offer_with("sendrecv"), session_id=7)
    held = answer(offer_with("sendonly"), previous=first)
    old_style_hold = answer(offer_with("sendrecv", host="0.0.0.0"), previous=held)
    resumed = answer(offer_with("sendrecv"), previous=old_style_hold)
    assert [a.session_version for a in (first, held, old_style_hold, resumed)] == [7, 8, 9, 10]
    assert {a.session_id for a in (held, old_style_hold, resumed)} == {7}
    assert [a.on_hold for a in (first, held, old_style_hold, resumed)] == [False, True, True, False]
    assert "o=- 7 10 IN IP4 192.0.2.10\r\n" in resumed.sdp
    assert resumed.remote_host == "10.0.0.5" and resumed.sending


def test_port_zero_audio_is_rejected() -> None:
    with pytest.raises(SdpError, match="port 0"):
        answer(offer_with(port=0))


def test_other_streams_are_rejected_with_port_zero_in_the_answer() -> None:
    offer = SIPP_OFFER + sdp("m=video 6002 RTP/AVP 34", "a=rtpmap:34 H263/90000")
    parsed = parse_back(answer(offer))
    assert [(m.kind, m.port) for m in parsed.media] == [("audio", 20000), ("video", 0)]


def test_no_audio_stream() -> None:
    offer = sdp(
        "v=0", "o=- 1 1 IN IP4 10.0.0.1", "s=-", "c=IN IP4 10.0.0.1", "t=0 0", "m=video 5004 RTP/AVP 34"
    )
    with pytest.raises(SdpError, match="no RTP/AVP audio"):
        answer(offer)


def test_srtp_only_offer_has_no_plain_audio_stream() -> None:
    with pytest.raises(SdpError, match="no RTP/AVP audio"):
        answer(SIPP_OFFER.replace("RTP/AVP", "RTP/SAVP"))


@pytest.mark.parametrize(
    "bad",
    [
        b"\xff\xfe not sdp",
        "hello",
    ],
)
def test_unparsable_sdp(bad: str | bytes) -> None:
    with pytest.raises(SdpError, match="unparsable"):
        answer(bad)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (("m=audio 6000 ", "m=audio 70000 "), "port 70000 is out of range"),
        (("m=audio 6000 ", "m=audio 65536 "), "port 65536 is out of range"),
        (("m=audio 6000 ", "m=audio x "), "port 'x' is not a port number"),
        (("m=audio 6000 ", "m=audio 6000/2 "), "port '6000/2' is not a port number"),
        (("m=audio 6000 ", "m=audio -1 "), "port '-1' is not a port number"),
        (("m=audio 6000 ", "m=audio \u0666\u0660\u0660\u0660 "), "is not a port number"),  # Arabic-Indic digits
        (("RTP/AVP 0 101", "RTP/AVP zero"), "payload type 'zero'"),
        (("RTP/AVP 0 101", "RTP/AVP 0 200"), "payload type '200'"),
        (("m=audio 6000 RTP/AVP 0 101", "m=audio 6000"), "malformed m= line"),
        (("c=IN IP4 127.0.0.1", "c=IN IP4 999.999.1.1"), "'999.999.1.1' is not an IP4 address literal"),
        (("c=IN IP4 127.0.0.1", "c=IN IP4 pbx.example.com"), "'pbx.example.com' is not an IP4"),
        (("c=IN IP4 127.0.0.1", "c=IN IP4 2001:db8::1"), "is not an IP4 address literal"),
        (("c=IN IP4 127.0.0.1", "c=IN IP6 127.0.0.1"), "is not an IP6 address literal"),
        (("c=IN IP4 127.0.0.1", "c=IN IP4 224.2.1.1/127"), "not an IP4 address literal"),
        (("c=IN IP4 127.0.0.1", "c=IN IP4 224.2.1.1"), "multicast"),
        (("c=IN IP4 127.0.0.1", "c=IN IP4"), "need IN IP4 or IN IP6"),
        (("a=rtpmap:0 PCMU/8000", "a=rtpmap:x PCMU/8000"), "malformed rtpmap"),
        (("a=rtpmap:0 PCMU/8000", "a=rtpmap:0 PCMU/fast"), "malformed rtpmap"),
        (("v=0", "v=1"), "unsupported SDP version"),
    ],
)
def test_offers_we_cannot_send_to_are_refused_naming_the_value(change, named) -> None:
    with pytest.raises(SdpError) as refused:
        answer(SIPP_OFFER.replace(*change))
    assert named in str(refused.value)


def test_media_address_of_the_other_family_than_ours_is_refused() -> None:
    with pytest.raises(SdpError, match="IPv6; our media is on IPv4"):
        answer(SIPP_OFFER.replace("c=IN IP4 127.0.0.1", "c=IN IP6 2001:db8::1"))
    held = answer(SIPP_OFFER.replace("c=IN IP4 127.0.0.1", "c=IN IP6 ::"))  # hold, nothing is sent
    assert held.on_hold


def test_malformed_attributes_we_do_not_use_are_ignored() -> None:
    # aiortc meets each of these with an assert or a bare int(); none of them matters to a G.711 call.
    extra = "a=candidate:1 1\r\na=rtcp:abc\r\na=ssrc:x y\r\na=setup:sideways\r\na=extmap:q u\r\n"
    result = answer(SIPP_OFFER + extra)
    assert result.codec == Codec("PCMU", 0) and result.remote_port == 6000


def test_non_internet_address_is_rejected() -> None:
    with pytest.raises(SdpError, match="IN IP4 or IN IP6"):
        answer(SIPP_OFFER.replace("c=IN IP4 127.0.0.1", "c=ATM NSAP 47.0091.8100.0000.0060.3e64.fd01"))


def test_missing_connection_line() -> None:
    with pytest.raises(SdpError, match="no c= line"):
        answer(SIPP_OFFER.replace("c=IN IP4 127.0.0.1\r\n", ""))


def test_sdp_error_is_a_value_error() -> None:
    assert issubclass(SdpError, ValueError)


def test_second_audio_stream_is_used_when_the_first_is_srtp() -> None:
    offer = SIPP_OFFER.replace("RTP/AVP", "RTP/SAVP") + sdp("m=audio 6002 RTP/AVP 8", "a=recvonly")
    result = answer(offer)
    assert (result.codec, result.remote_port, result.direction) == (Codec("PCMA", 8), 6002, "sendonly")
    assert result.sending and not result.on_hold
    parsed = SessionDescription.parse(result.sdp)
    assert [(m.port, m.profile, m.fmt) for m in parsed.media] == [
        (0, "RTP/SAVP", [0, 101]),
        (20000, "RTP/AVP", [8]),
    ]
