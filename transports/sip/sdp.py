"""SDP offer/answer (RFC 3264) for one G.711 phone audio stream.

Parsing uses aiortc's `SessionDescription.parse`, with three gaps filled here:
it ignores session-level direction attributes and `a=ptime`, and it meets
malformed input with asserts and bare `int()` (and raises StopIteration on an
`a=fmtp` line whose payload type has no `a=rtpmap`, common for static types,
e.g. `a=fmtp:18 annexb=no`). So only the lines we use reach it (v, o, s, c, t,
m, rtpmap, direction, ptime), each checked first, and the two missing attributes
are read from those lines.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from dataclasses import dataclass

from aiortc.rtcicetransport import RTCIceParameters
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.sdp import DIRECTIONS, MediaDescription, SessionDescription, grouplines

G711_CLOCK_RATE = 8000  # G.711's sample rate, which is also its RTP clock and RFC 4733's event clock
TELEPHONE_EVENT = "telephone-event"
TELEPHONE_EVENTS = "0-16"  # DTMF 0-9, *, #, A-D, flash (RFC 4733 section 3.2)
AUDIO_PROFILE = "RTP/AVP"

# RFC 3551 table 4: static audio payload types, used when an offer has no rtpmap for them.
STATIC_PAYLOAD_TYPES = {0: "PCMU", 3: "GSM", 4: "G723", 8: "PCMA", 9: "G722", 13: "CN", 18: "G729"}

# What each offered direction lets us do, seen from our side (RFC 3264 section 6.1).
ANSWER_DIRECTION = {
    "sendrecv": "sendrecv",
    "sendonly": "recvonly",
    "recvonly": "sendonly",
    "inactive": "inactive",
}

_CONNECTION = re.compile(r"^IN (IP4|IP6) (\S+)$")
_MEDIA = re.compile(r"^m=(\S+) (\S+) (\S+)(?: (.*))?$")
_RTPMAP = re.compile(r"^([0-9]{1,3}) ([^/\s]+)/([0-9]{1,6})(?:/([0-9]{1,2}))?$")
MAX_PORT = 65535
MAX_PAYLOAD_TYPE = 127  # 7 bits in the RTP header (RFC 3550 5.1)
# The offer's lines we read; the rest (ICE, DTLS, ssrc, rtcp, fmtp...) never reach aiortc's parser,
# which meets malformed values of those with asserts and bare int().
_KEPT_PREFIXES = ("v=", "o=", "s=", "c=", "t=", "m=", "a=rtpmap:", "a=ptime:")


class SdpError(ValueError):
    """The offer cannot be accepted; a UAS answers 488 Not Acceptable Here."""


@dataclass(frozen=True)
class Codec:
    name: str
    payload_type: int
    clock_rate: int = G711_CLOCK_RATE


@dataclass(frozen=True)
class Answer:
    """The outcome of one offer/answer exchange, and the answer's SDP text."""

    codec: Codec
    telephone_event_pt: int | None
    remote_host: str
    remote_port: int
    remote_direction: str
    direction: str
    ptime: int
    session_id: int
    session_version: int
    sdp: str

    @property
    def on_hold(self) -> bool:
        """The far end does not want our audio (sendonly, inactive or c=0.0.0.0)."""
        return self.direction in ("recvonly", "inactive")

    @property
    def sending(self) -> bool:
        return self.direction in ("sendrecv", "sendonly")

    @property
    def receiving(self) -> bool:
        return self.direction in ("sendrecv", "recvonly")


def negotiate(
    offer: str | bytes,
    *,
    local_ip: str,
    local_port: int,
    codecs: tuple[str, ...] = ("PCMU", "PCMA"),
    ptime: int = 20,
    session_id: int | None = None,
    previous: Answer | None = None,
) -> Answer:
    """Answer an SDP offer (initial or re-INVITE) with one G.711 audio stream.

    Among the offered codecs we accept, the offer's order wins (RFC 3264 section 6.1).
    Pass the previous answer on a re-offer so our o= version goes up by one (section 8).
    """
    text = _checked(_decode(offer))
    session_lines, media_groups = grouplines(text)
    try:
        parsed = SessionDescription.parse(text)
    except Exception as exc:  # a last guard: the lines it reads were checked above
        raise SdpError(f"unparsable SDP: {exc!r}") from exc

    session_direction = _direction(session_lines) or "sendrecv"
    session_ptime = _ptime(session_lines)
    accepted = tuple(name.upper() for name in codecs)

    chosen: tuple[int, MediaDescription, Codec] | None = None
    offered: list[str] = []
    audio_lines = 0
    for index, media in enumerate(parsed.media):
        if media.kind != "audio" or media.profile != AUDIO_PROFILE:
            continue
        audio_lines += 1
        if media.port == 0:
            continue
        codec = _choose_codec(media, accepted, offered)
        if codec is not None:
            chosen = (index, media, codec)
            break

    if chosen is None:
        if audio_lines == 0:
            raise SdpError(f"no {AUDIO_PROFILE} audio stream in the offer")
        if not offered:
            raise SdpError("the offer's audio streams are all rejected (port 0)")
        raise SdpError(f"no common codec: offered {', '.join(offered)}; we accept {', '.join(accepted)}")
    index, media, codec = chosen

    remote_host = media.host or parsed.host
    if remote_host is None:
        raise SdpError("no c= line for the audio stream")
    _check_reachable(remote_host, local_ip)
    remote_direction = media.direction or session_direction
    if _is_null_address(remote_host):
        # RFC 2543-style hold (RFC 3264 section 8.4): the offerer will not receive.
        remote_direction = "sendonly" if remote_direction in ("sendrecv", "sendonly") else "inactive"
    direction = ANSWER_DIRECTION[remote_direction]
    telephone_event_pt = _telephone_event_pt(media)
    media_lines = media_groups[index]
    offered_ptime = _ptime(media_lines[1:]) or session_ptime
    answer_ptime = offered_ptime or ptime

    if previous is not None:
        session_id, session_version = previous.session_id, previous.session_version + 1
    else:
        session_id = session_id if session_id is not None else secrets.randbits(62)
        session_version = session_id

    sdp = _build_answer(
        parsed,
        index,
        codec,
        telephone_event_pt,
        direction,
        answer_ptime,
        local_ip=local_ip,
        local_port=local_port,
        origin=f"- {session_id} {session_version} {_address_type(local_ip)} {local_ip}",
    )
    return Answer(
        codec=codec,
        telephone_event_pt=telephone_event_pt,
        remote_host=remote_host,
        remote_port=media.port,
        remote_direction=remote_direction,
        direction=direction,
        ptime=answer_ptime,
        session_id=session_id,
        session_version=session_version,
        sdp=sdp,
    )


def _decode(offer: str | bytes) -> str:
    if isinstance(offer, bytes):
        try:
            offer = offer.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SdpError("unparsable SDP: not UTF-8") from exc
    if not offer.lstrip().startswith("v="):
        raise SdpError("unparsable SDP: does not start with v=")
    return offer


def _checked(text: str) -> str:
    """The offer's lines that negotiation reads, each checked; SdpError names the first bad one.

    An address or port we cannot send to must be refused here (488), not found out after our 200 OK
    when the first RTP packet goes out; and `c=` must be an IP literal, or sending would resolve a
    host name in the middle of the call.
    """
    kept = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith(_KEPT_PREFIXES) and not (line[2:] in DIRECTIONS and line.startswith("a=")):
            continue
        if line.startswith("c="):
            _check_connection(line)
        elif line.startswith("m="):
            _check_media(line)
        elif line.startswith("a=rtpmap:"):
            _check_rtpmap(line)
        elif line.startswith("v=") and line != "v=0":
            raise SdpError(f"unsupported SDP version: {line[:40]!r}")
        kept.append(line)
    return "\r\n".join(kept) + "\r\n"


def _check_connection(line: str) -> None:
    match = _CONNECTION.match(line[2:])
    if match is None:
        raise SdpError(f"unsupported connection line (need IN IP4 or IN IP6 and an address): {line[:80]!r}")
    family, host = match.groups()
    kind = ipaddress.IPv4Address if family == "IP4" else ipaddress.IPv6Address
    try:
        address = kind(host)
    except ValueError:
        raise SdpError(f"connection address {host[:60]!r} is not an {family} address literal") from None
    if address.is_multicast:
        raise SdpError(f"connection address {host} is multicast; only unicast media is supported")


def _check_media(line: str) -> None:
    match = _MEDIA.match(line)
    if match is None:
        raise SdpError(f"malformed m= line: {line[:80]!r}")
    kind, port, profile, formats = match.groups()
    if not port.isascii() or not port.isdigit():
        raise SdpError(f"m={kind} port {port[:20]!r} is not a port number (one port, no /count)")
    if int(port) > MAX_PORT:
        raise SdpError(f"m={kind} port {port[:20]} is out of range (0-{MAX_PORT})")
    if not re.fullmatch(r"[A-Z/]+", profile):
        raise SdpError(f"m={kind} transport {profile[:20]!r} is not supported")
    if not formats:
        raise SdpError(f"m={kind} line has no formats")
    if kind in ("audio", "video"):
        for pt in formats.split():
            if not pt.isascii() or not pt.isdigit() or int(pt) > MAX_PAYLOAD_TYPE:
                raise SdpError(f"m={kind} payload type {pt[:20]!r} is not 0-{MAX_PAYLOAD_TYPE}")


def _check_rtpmap(line: str) -> None:
    match = _RTPMAP.match(line[len("a=rtpmap:") :])
    if match is None or int(match.group(1)) > MAX_PAYLOAD_TYPE or int(match.group(3)) == 0:
        raise SdpError(f"malformed rtpmap: {line[:80]!r}")


def _check_reachable(remote_host: str, local_ip: str) -> None:
    """Our RTP socket is of our address's family: an address of the other family cannot be sent to."""
    try:
        remote, local = ipaddress.ip_address(remote_host), ipaddress.ip_address(local_ip)
    except ValueError:
        return  # local_ip is a name (public_address): nothing to compare
    if remote.version != local.version and not remote.is_unspecified:
        raise SdpError(f"media address {remote_host} is IPv{remote.version}; our media is on IPv{local.version}")


def _direction(lines: list[str]) -> str | None:
    found = [line[2:].strip() for line in lines if line.startswith("a=")]
    found = [value for value in found if value in DIRECTIONS]
    return found[-1] if found else None


def _ptime(lines: list[str]) -> int | None:
    for line in lines:
        if line.startswith("a=ptime:"):
            try:
                value = round(float(line[len("a=ptime:") :]))
            except ValueError:
                return None
            return value if 10 <= value <= 200 else None
    return None


def _offered_codecs(media: MediaDescription) -> list[tuple[int, str, int]]:
    """(payload type, encoding name, clock rate) for each format on the m= line, in order."""
    mapped = {c.payloadType: c for c in media.rtp.codecs}
    result = []
    for pt in media.fmt:
        if pt in mapped:
            result.append((pt, mapped[pt].name, mapped[pt].clockRate))
        elif pt in STATIC_PAYLOAD_TYPES:
            result.append((pt, STATIC_PAYLOAD_TYPES[pt], G711_CLOCK_RATE))
        else:
            result.append((pt, f"PT {pt}", 0))
    return result


def _choose_codec(media: MediaDescription, accepted: tuple[str, ...], offered: list[str]) -> Codec | None:
    for pt, name, clock_rate in _offered_codecs(media):
        if name.lower() in (TELEPHONE_EVENT, "cn"):
            continue
        if name.upper() in accepted and clock_rate == G711_CLOCK_RATE:
            return Codec(name=name.upper(), payload_type=pt)
        if name not in offered:
            offered.append(name)
    return None


def _telephone_event_pt(media: MediaDescription) -> int | None:
    for pt, name, clock_rate in _offered_codecs(media):
        if name.lower() == TELEPHONE_EVENT and clock_rate == G711_CLOCK_RATE:
            return pt
    return None


def _is_null_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _address_type(ip: str) -> str:
    return f"IN IP{ipaddress.ip_address(ip).version}"


def _build_answer(
    offer: SessionDescription,
    audio_index: int,
    codec: Codec,
    telephone_event_pt: int | None,
    direction: str,
    ptime: int,
    *,
    local_ip: str,
    local_port: int,
    origin: str,
) -> str:
    session = SessionDescription()
    session.origin = origin
    session.host = local_ip
    text = str(session)

    for index, offered in enumerate(offer.media):
        if index != audio_index:
            # RFC 3264 section 6: one m= line per offered stream; port 0 rejects it.
            rejected = MediaDescription(offered.kind, 0, offered.profile, offered.fmt)
            rejected.ice = RTCIceParameters()
            text += str(rejected)
            continue
        fmt = [codec.payload_type]
        audio = MediaDescription("audio", local_port, AUDIO_PROFILE, fmt)
        audio.ice = RTCIceParameters()
        audio.direction = direction
        audio.rtp.codecs.append(
            RTCRtpCodecParameters(
                mimeType=f"audio/{codec.name}", clockRate=codec.clock_rate, payloadType=codec.payload_type
            )
        )
        if telephone_event_pt is not None:
            fmt.append(telephone_event_pt)
            audio.rtp.codecs.append(
                RTCRtpCodecParameters(
                    mimeType=f"audio/{TELEPHONE_EVENT}",
                    clockRate=G711_CLOCK_RATE,
                    payloadType=telephone_event_pt,
                    parameters={TELEPHONE_EVENTS: None},
                )
            )
        text += str(audio) + f"a=ptime:{ptime}\r\n"
    return text
