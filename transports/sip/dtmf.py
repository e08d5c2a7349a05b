"""DTMF as RFC 4733 telephone-events: parse, build, and the packet train of one key press.

One key press is a series of RTP packets that share the timestamp of the event's
start, carry a growing duration, and end with three copies of the packet with the
E bit set (section 2.5.1.4), so the timestamp is what identifies a press.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from aiortc.rtp import RtpPacket

from .sdp import G711_CLOCK_RATE

PAYLOAD_LENGTH = 4
# Section 3.2: events 0-15 are the DTMF keys, in this order.
DTMF_DIGITS = "0123456789*#ABCD"
END_PACKET_COPIES = 3
DEFAULT_VOLUME = 10  # -10 dBm0, a typical phone's level
MAX_DURATION = 0xFFFF


@dataclass(frozen=True)
class DtmfEvent:
    """One telephone-event payload: event code, E bit, volume (-dBm0), duration in clock ticks."""

    event: int
    end: bool = False
    volume: int = DEFAULT_VOLUME
    duration: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.event <= 0xFF:
            raise ValueError(f"event code {self.event} out of range")
        if not 0 <= self.volume <= 0x3F:
            raise ValueError(f"volume {self.volume} out of range 0-63")
        if not 0 <= self.duration <= MAX_DURATION:
            raise ValueError(f"duration {self.duration} out of range")

    @classmethod
    def for_digit(cls, digit: str, **fields: int | bool) -> DtmfEvent:
        code = DTMF_DIGITS.find(digit.upper()) if len(digit) == 1 else -1
        if code < 0:
            raise ValueError(f"not a DTMF digit: {digit!r}")
        return cls(event=code, **fields)

    @property
    def digit(self) -> str | None:
        """The key for events 0-15; None for other events (e.g. 16, flash)."""
        return DTMF_DIGITS[self.event] if self.event < len(DTMF_DIGITS) else None

    @classmethod
    def parse(cls, payload: bytes) -> DtmfEvent:
        if len(payload) != PAYLOAD_LENGTH:
            raise ValueError(f"telephone-event payload is {len(payload)} bytes, expected {PAYLOAD_LENGTH}")
        event, flags, duration = struct.unpack("!BBH", payload)
        # The R bit (0x40) is reserved: senders set it to zero, receivers ignore it.
        return cls(event=event, end=bool(flags & 0x80), volume=flags & 0x3F, duration=duration)

    def __bytes__(self) -> bytes:
        return struct.pack("!BBH", self.event, (0x80 if self.end else 0) | self.volume, self.duration)


class DtmfReceiver:
    """Turns received telephone-event packets into key presses, each reported once."""

    def __init__(self, remembered: int = 32) -> None:
        # Timestamps of presses already reported; a few dozen outlive any retransmission.
        self._seen: deque[int] = deque(maxlen=remembered)
        self.digits: list[str] = []

    def feed(self, timestamp: int, payload: bytes, marker: bool = False) -> str | None:
        """Take one packet; return the digit if this packet is the first seen of a new press.

        Reports on the first packet rather than the end packet, so a press is not missed
        when its end packets are lost, and the agent can react while the key is held.
        `marker` only flags an event's start (section 2.5.1.3); a lost first packet must
        not hide the press, so the timestamp decides.
        """
        event = DtmfEvent.parse(payload)
        if timestamp in self._seen:
            return None
        self._seen.append(timestamp)
        if event.digit is None:
            return None
        self.digits.append(event.digit)
        return event.digit

    def feed_packet(self, packet: RtpPacket) -> str | None:
        return self.feed(packet.timestamp, packet.payload, bool(packet.marker))


def dtmf_packets(
    digit: str,
    *,
    payload_type: int,
    ssrc: int,
    seq: int,
    timestamp: int,
    duration_ms: int = 160,
    ptime_ms: int = 20,
    volume: int = DEFAULT_VOLUME,
) -> list[RtpPacket]:
    """The RTP packets that send one key press, one per ptime, ready to serialize.

    The caller advances its own sequence number by len(result) afterwards.
    """
    step = G711_CLOCK_RATE * ptime_ms // 1000
    total = G711_CLOCK_RATE * duration_ms // 1000
    if step <= 0 or not 0 < total <= MAX_DURATION:
        raise ValueError(f"duration {duration_ms} ms / ptime {ptime_ms} ms not sendable")
    durations = list(range(step, total, step)) + [total] * END_PACKET_COPIES
    packets = []
    for i, duration in enumerate(durations):
        event = DtmfEvent.for_digit(digit, end=duration == total, volume=volume, duration=duration)
        packets.append(
            RtpPacket(
                payload_type=payload_type,
                marker=1 if i == 0 else 0,
                sequence_number=(seq + i) % (1 << 16),
                timestamp=timestamp,
                ssrc=ssrc,
                payload=bytes(event),
            )
        )
    return packets
