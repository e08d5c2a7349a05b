"""Fixed-depth jitter buffer for one 8 kHz G.711 RTP stream.

The receiver's clock calls `pop()` once per ptime; each call plays the next
sequence number. Playback starts once enough packets are buffered to absorb the
network's jitter: `depth_packets` at least, more when the measured jitter (RFC 3550)
calls for it, up to `max_depth`. A phone sends packets even in silence, so that
depth is a delay on everything the caller says, barge-in included: it starts small
and grows only when an underrun restarts playback on a jittery network. Sequence numbers are 16 bits on the wire and
wrap; inside the buffer they are widened to unbounded "extended" numbers
(RFC 3550 appendix A.1) so that ordering is plain integer comparison.

RFC 4733 telephone-events share the audio's SSRC and sequence numbers, so a key press
leaves a gap in the audio's numbering; `skip()` marks those numbers as taken, and the
gap they fill is neither played as silence nor counted as lost.

Concealment: a missing packet makes `pop()` return None and the caller plays
comfort silence (mu-law 0xFF, A-law 0xD5). Repeating the previous frame with a
fade sounds better for one lost packet, but belongs with the codec, not here.
"""

from __future__ import annotations

import math
from collections import deque

from aiortc.rtp import RtpPacket

from .sdp import G711_CLOCK_RATE

SEQ_MODULO = 1 << 16


def seq_delta(seq: int, reference: int) -> int:
    """Signed distance from `reference` to `seq`, both 16-bit, across wrap-around."""
    delta = (seq - reference) % SEQ_MODULO
    return delta - SEQ_MODULO if delta >= SEQ_MODULO // 2 else delta


class JitterBuffer:
    def __init__(
        self, *, ptime_ms: int = 20, depth_packets: int = 3, max_depth: int = 8, max_packets: int = 50
    ) -> None:
        if not 1 <= depth_packets <= max_depth <= max_packets:
            raise ValueError("need 1 <= depth_packets <= max_depth <= max_packets")
        self.ptime_ms = ptime_ms
        self.depth_packets = depth_packets
        self.max_depth = max_depth
        self.max_packets = max_packets
        self.received = 0
        self.played = 0
        self.late = 0
        self.duplicate = 0
        self.lost = 0
        self.reordered = 0
        self.resets = 0
        # RFC 3550 A.8 interarrival jitter, in RTP timestamp units.
        self.jitter = 0.0
        self._start_stream(ssrc=None)

    def _start_stream(self, ssrc: int | None) -> None:
        self._ssrc = ssrc
        self._buffer: dict[int, bytes] = {}
        self._highest: int | None = None  # extended seq of the newest packet seen
        self._next: int | None = None  # extended seq that the next pop() plays
        self._playing = False
        self._waited = 0  # pops spent prebuffering with something in the buffer
        self._recently_played: deque[int] = deque(maxlen=self.max_packets)
        self._not_audio: set[int] = set()  # extended seqs of the stream's event packets (RFC 4733)
        self._transit: float | None = None

    @property
    def jitter_ms(self) -> float:
        return self.jitter * 1000 / G711_CLOCK_RATE

    @property
    def start_depth(self) -> int:
        """Packets to buffer before playing: room for about three times the mean jitter."""
        wanted = 1 + math.ceil(3 * self.jitter_ms / self.ptime_ms)
        return min(self.max_depth, max(self.depth_packets, wanted))

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def _extend(self, packet: RtpPacket) -> int:
        """The packet's extended sequence number; a new or restarted stream starts afresh here."""
        if self._ssrc != packet.ssrc:
            # A new SSRC is a new stream (re-INVITE, transfer): its numbering starts afresh.
            if self._ssrc is not None:
                self.resets += 1
            self._start_stream(packet.ssrc)

        if self._highest is None:
            ext = packet.sequence_number
        else:
            ext = self._highest + seq_delta(packet.sequence_number, self._highest % SEQ_MODULO)
            if abs(ext - self._highest) > self.max_packets:
                # Far outside the window either way: the sender restarted its numbering
                # (RFC 3550 A.1 treats this as a restart too). Start over from this packet.
                self.resets += 1
                self._start_stream(packet.ssrc)
                ext = packet.sequence_number
        return ext

    def _gap(self, first: int, end: int) -> int:
        """Audio packets missing in [first, end): numbers the stream's event packets took are not."""
        return sum(1 for ext in range(first, end) if ext not in self._not_audio)

    def skip(self, packet: RtpPacket) -> None:
        """A packet of the stream that carries no audio (an RFC 4733 event): its number is taken."""
        ext = self._extend(packet)
        if self._next is not None and ext < self._next:
            return
        self._not_audio.add(ext)
        self._highest = ext if self._highest is None else max(self._highest, ext)
        while len(self._not_audio) > self.max_packets:
            self._not_audio.discard(min(self._not_audio))

    def push(self, packet: RtpPacket, arrival: float) -> None:
        """Take one received packet; `arrival` is the receive time in seconds."""
        self.received += 1
        ext = self._extend(packet)
        if self._next is not None and ext < self._next:
            if ext in self._recently_played:
                self.duplicate += 1
            else:
                self.late += 1
            return
        if ext in self._buffer:
            self.duplicate += 1
            return
        if self._highest is not None and ext < self._highest:
            self.reordered += 1
        self._update_jitter(packet.timestamp, arrival)
        self._buffer[ext] = packet.payload
        self._highest = ext if self._highest is None else max(self._highest, ext)
        while len(self._buffer) > self.max_packets:
            # Nobody is popping fast enough: drop the oldest rather than grow the delay.
            oldest = min(self._buffer)
            del self._buffer[oldest]
            self.late += 1
            if self._next is not None:
                self.lost += self._gap(self._next, oldest)
            self._next = oldest + 1
            self._forget_not_audio()

    def _update_jitter(self, timestamp: int, arrival: float) -> None:
        transit = arrival * G711_CLOCK_RATE - timestamp
        if self._transit is not None:
            self.jitter += (abs(transit - self._transit) - self.jitter) / 16
        self._transit = transit

    def pop(self) -> bytes | None:
        """Next ptime of payload in sequence order, or None: play comfort silence."""
        if not self._playing:
            if not self._buffer:
                return None
            self._waited += 1
            # Start at full depth, or after waiting that long for a short talk spurt.
            depth = self.start_depth
            if len(self._buffer) < depth and self._waited <= depth:
                return None
            first = min(self._buffer)
            if self._next is not None:
                # Skip ahead over a burst loss that emptied the buffer.
                self.lost += self._gap(self._next, first)
            self._next = first
            self._playing = True
            self._waited = 0
            self._forget_not_audio()

        if self._next is None:  # cannot happen once playing; never let it pass as a sequence number
            self._playing = False
            return None
        while self._next in self._not_audio:
            # An event took this number: no audio is missing, and the next audio plays in this tick.
            self._not_audio.discard(self._next)
            self._next += 1
        payload = self._buffer.pop(self._next, None)
        if payload is not None:
            self.played += 1
            self._recently_played.append(self._next)
            self._next += 1
            return payload
        if not self._buffer:
            # Underrun: wait for the stream to build up again instead of counting
            # every tick of a pause (or silence suppression) as a lost packet.
            self._playing = False
            return None
        self.lost += 1
        self._next += 1
        return None

    def _forget_not_audio(self) -> None:
        if self._next is not None:
            self._not_audio = {ext for ext in self._not_audio if ext >= self._next}
