"""SDP offer/answer (RFC 3264) for one G.711 phone audio stream.

Parsing uses aiortc's `SessionDescription.parse`, with three gaps filled here:
it ignores session-level direction attributes and `a=ptime`, and it raises
StopIteration on an `a=fmtp` line whose payload type has no `a=rtpmap` (common
for static types, e.g. `a=fmtp:18 annexb=no`). We never use the offer's fmtp
parameters, so fmtp lines are dropped before parsing and the two missing
attributes are read from the raw lines.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from dataclasses import dataclass

from aiortc.rtcicetransport import RTCIceParameters
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.sdp import DIRECTIONS, MediaDescription, SessionDescription, grouplines

G711_CLOCK_RATE = 8000
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
    text = _decode(offer)
    _check_connection_lines(text)
    session_lines, media_groups = grouplines(text)
    try:
        parsed = SessionDescription.parse(_without_fmtp(text))
    except Exception as exc:  # aiortc uses asserts and bare lookups on malformed input
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


def _check_connection_lines(text: str) -> None:
    for line in text.splitlines():
        if line.startswith("c=") and not _CONNECTION.match(line[2:].strip()):
            raise SdpError(f"unsupported connection address (need IN IP4 or IN IP6): {line!r}")


def _without_fmtp(text: str) -> str:
    return "\r\n".join(line for line in text.splitlines() if not line.startswith("a=fmtp:"))


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
