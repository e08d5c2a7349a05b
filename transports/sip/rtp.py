"""RTP media for one SIP call: G.711 in and out on a 20 ms clock, RFC 4733 DTMF both ways.

    pool = PortPool("127.0.0.1", 20000, 20999)
    session = await RtpSession.open(pool, on_audio=..., on_dtmf=...)
    session.configure(answer)            # from sdp.negotiate; again on every re-INVITE
    session.start()
    await session.play(pcm_8k)           # returns once at most one packet waits ahead of the wire
    session.drop_queued()                # barge-in: the next packet out is silence
    session.close()                      # frees the port pair

One task ticks every 20 ms on an absolute schedule: it pops the jitter buffer and hands the caller's
audio up (silence where nothing arrived, as a phone line would), then sends our next packet.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable

import numpy as np
from aiortc.rtp import RtpPacket
from loguru import logger

from processors.audio import alaw_decode, alaw_encode, ulaw_decode, ulaw_encode

from .dtmf import PAYLOAD_LENGTH, DtmfReceiver, dtmf_packets
from .jitter import JitterBuffer
from .sdp import G711_CLOCK_RATE, Answer

PTIME = 0.02
SAMPLES_PER_FRAME = round(PTIME * G711_CLOCK_RATE)  # 160 samples (and G.711 bytes) per packet
FRAME_BYTES = SAMPLES_PER_FRAME * 2  # int16 PCM
RTP_HEADER_LENGTH = 12
MAX_DATAGRAM = 1500
# A tick this late means the loop stalled; catch up from now instead of bursting the missed packets.
MAX_LATENESS = 0.1
# A latched source silent this long may be replaced by a new one (a NAT that rebound the caller's port).
RELATCH_AFTER = 2.0

# name: (encode, decode, silence byte); 0xFF and 0xD5 are the codecs' zero levels.
CODECS = {"PCMU": (ulaw_encode, ulaw_decode, 0xFF), "PCMA": (alaw_encode, alaw_decode, 0xD5)}

Address = tuple[str, int]


class NoFreePort(RuntimeError):
    """Every RTP port pair of the pool is in use."""


class PortPool:
    """Even RTP ports in [first, last], each with the next odd one for RTCP.

    Freed ports go to the back of the line, so a late packet of an ended call does not land in
    the next call on the same port.
    """

    def __init__(self, host: str, first: int, last: int):
        start = first + (first % 2)
        if start + 1 > last:
            raise ValueError(f"RTP port range {first}-{last} holds no even/odd pair")
        self.host = host
        self.first, self.last = first, last
        self._free: deque[int] = deque(range(start, last, 2))
        self.in_use: set[int] = set()

    @property
    def size(self) -> int:
        return len(self._free) + len(self.in_use)

    def take(self) -> int:
        if not self._free:
            raise NoFreePort(f"all {self.size} RTP port pairs in {self.first}-{self.last} are in use")
        port = self._free.popleft()
        self.in_use.add(port)
        return port

    def give_back(self, port: int) -> None:
        if port in self.in_use:
            self.in_use.discard(port)
            self._free.append(port)


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Address], None] | None):
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr) -> None:
        if self.on_datagram is not None:
            self.on_datagram(data, addr[:2])

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a peer that went away: the silence timeout handles a dead peer.
        pass


class RtpSession:
    """Counters: packets_in, packets_out, bad (unparsable or wrong PT), foreign (unexpected source),
    late and lost (from the jitter buffer), caught_up, dtmf_in, dtmf_out."""

    def __init__(
        self,
        pool: PortPool,
        *,
        on_audio: Callable[[bytes], Awaitable[None]] | None = None,
        on_dtmf: Callable[[str], Awaitable[None]] | None = None,
        jitter_depth: int = 1,
        name: str = "rtp",
    ):
        self.pool = pool
        self.on_audio = on_audio
        self.on_dtmf = on_dtmf
        self.name = name
        self.port: int | None = None
        self.jitter = JitterBuffer(ptime_ms=int(PTIME * 1000), depth_packets=jitter_depth)
        self.dtmf = DtmfReceiver()
        self.answer: Answer | None = None
        self.remote: Address | None = None
        self.latched = False
        self.packets_in = self.packets_out = self.bad = self.foreign = 0
        self.caught_up = 0  # packets handed on early to drain a backlog after the loop stalled
        self.dtmf_in = self.dtmf_out = 0
        self.last_received = time.monotonic()
        self._rtp: asyncio.DatagramTransport | None = None
        self._rtcp: asyncio.DatagramTransport | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self._logged: set[str] = set()
        self._callbacks: set[asyncio.Future] = set()
        self._last_from_remote = 0.0
        # Sending: continuous sequence, timestamp and SSRC for the whole call (RFC 3550 5.1).
        self._seq = random.randrange(1 << 16)
        self._timestamp = random.randrange(1 << 32)
        self._ssrc = random.randrange(1, 1 << 32)
        self._queue: deque[bytes] = deque()  # 160-sample PCM frames
        self._received = bytearray()  # decoded caller audio not yet handed up
        self._partial = bytearray()
        self._talking = False
        self._dtmf_digits: deque[tuple[str, asyncio.Future]] = deque()
        self._dtmf_train: deque[RtpPacket] = deque()
        self._dtmf_done: asyncio.Future | None = None
        self._room = asyncio.Event()
        self._encode = self._decode = None
        self._silence_byte = 0xFF
        self._codec_pt = 0
        self._sending = self._receiving = False

    # Lifecycle ---------------------------------------------------------------------------------

    @classmethod
    async def open(cls, pool: PortPool, **kwargs) -> RtpSession:
        """Bind a free port pair of the pool; NoFreePort when none can be had."""
        session = cls(pool, **kwargs)
        loop = asyncio.get_running_loop()
        for _ in range(pool.size):
            port = pool.take()
            try:
                session._rtp, _ = await loop.create_datagram_endpoint(
                    lambda: _Endpoint(session._datagram_received), local_addr=(pool.host, port)
                )
            except OSError:
                # Another program holds it: skip it (it goes to the back of the pool) and try the next.
                pool.give_back(port)
                continue
            try:
                # RTCP is bound so nothing else takes the port the SDP implies; what arrives is ignored.
                session._rtcp, _ = await loop.create_datagram_endpoint(
                    lambda: _Endpoint(None), local_addr=(pool.host, port + 1)
                )
            except OSError:
                session._rtp.close()
                pool.give_back(port)
                continue
            session.port = port
            return session
        raise NoFreePort(f"no RTP port pair in {pool.first}-{pool.last} could be bound")

    def configure(self, answer: Answer) -> None:
        """Apply an offer/answer outcome: codec, DTMF payload type, peer address, direction."""
        encode, decode, silence = CODECS[answer.codec.name.upper()]
        self._encode, self._decode, self._silence_byte = encode, decode, silence
        self._codec_pt = answer.codec.payload_type
        address = (answer.remote_host, answer.remote_port)
        if self.answer is None or address != (self.answer.remote_host, self.answer.remote_port):
            # New SDP address (first offer, or a re-INVITE that moved the media): latch afresh.
            self.remote, self.latched = address, False
        if self._sending and not answer.sending:
            self._talking = False
        self._sending, self._receiving = answer.sending, answer.receiving
        self.answer = answer
        self.last_received = time.monotonic()

    @property
    def telephone_event_pt(self) -> int | None:
        return self.answer.telephone_event_pt if self.answer else None

    @property
    def on_hold(self) -> bool:
        return self.answer is not None and self.answer.on_hold

    @property
    def idle_seconds(self) -> float:
        """Seconds since the last RTP packet from the peer (or since the last configure)."""
        return time.monotonic() - self.last_received

    def start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._clock(), name=f"rtp-{self.name}")

    def close(self) -> None:
        """Stop the clock, close both sockets, give the ports back. Safe to call again."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        for transport in (self._rtp, self._rtcp):
            if transport is not None:
                transport.close()
        if self.port is not None:
            self.pool.give_back(self.port)
        self._queue.clear()
        self._room.set()
        for _digit, done in self._dtmf_digits:
            if not done.done():
                done.set_result(False)
        if self._dtmf_done is not None and not self._dtmf_done.done():
            self._dtmf_done.set_result(False)

    def stats(self) -> dict[str, int]:
        names = ("packets_in", "packets_out", "bad", "foreign", "caught_up", "dtmf_in", "dtmf_out")
        return {name: getattr(self, name) for name in names} | {
            "late": self.jitter.late,
            "lost": self.jitter.lost,
        }

    def _note_once(self, kind: str, message: str) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            logger.warning(f"RTP {self.name}: {message} (dropped; logged once per call)")

    # Receiving ---------------------------------------------------------------------------------

    def _datagram_received(self, data: bytes, addr: Address) -> None:
        """Never raises: a bad packet is counted and dropped."""
        if self._closed or self.answer is None:
            return
        try:
            self._receive(data, addr)
        except Exception:
            self.bad += 1
            self._note_once("internal", f"a packet from {addr[0]}:{addr[1]} could not be handled")

    def _receive(self, data: bytes, addr: Address) -> None:
        try:
            packet = RtpPacket.parse(data) if RTP_HEADER_LENGTH <= len(data) <= MAX_DATAGRAM else None
        except (ValueError, IndexError):
            packet = None
        if packet is None:
            self.bad += 1
            self._note_once("garbage", f"unparsable datagram of {len(data)} bytes from {addr[0]}:{addr[1]}")
            return
        te_pt = self.telephone_event_pt
        if packet.payload_type not in (self._codec_pt, te_pt):
            self.bad += 1
            self._note_once("pt", f"payload type {packet.payload_type} was not negotiated")
            return
        if packet.payload_type == te_pt and len(packet.payload) != PAYLOAD_LENGTH:
            self.bad += 1
            self._note_once("dtmf", "malformed telephone-event payload")
            return
        if not self._accept_source(addr):
            self.foreign += 1
            self._note_once("source", f"packets from {addr[0]}:{addr[1]}, not the call's peer")
            return
        self.packets_in += 1
        now = time.monotonic()
        self.last_received = self._last_from_remote = now
        if not self._receiving:
            return
        if packet.payload_type == self._codec_pt:
            self.jitter.push(packet, now)
            return
        self.jitter.skip(packet)  # the event took an audio sequence number: not a lost packet
        digit = self.dtmf.feed_packet(packet)
        if digit is not None:
            self.dtmf_in += 1
            if self.on_dtmf is not None:
                task = asyncio.ensure_future(self._report_dtmf(digit))
                self._callbacks.add(task)  # held until done: the loop keeps only weak references
                task.add_done_callback(self._callbacks.discard)

    async def _report_dtmf(self, digit: str) -> None:
        try:
            await self.on_dtmf(digit)
        except Exception:
            logger.exception(f"RTP {self.name}: DTMF callback failed")

    def _accept_source(self, addr: Address) -> bool:
        """Symmetric RTP: answer where the peer's packets come from (it may be behind NAT)."""
        if self.latched and addr == self.remote:
            return True
        signalled = self.answer.remote_host, self.answer.remote_port
        # The address the SDP names always wins; another one only while the stream has no source.
        if addr == signalled or not self.latched or time.monotonic() - self._last_from_remote > RELATCH_AFTER:
            if addr != self.remote:
                logger.info(f"RTP {self.name}: peer sends from {addr[0]}:{addr[1]}; answering there")
            self.remote, self.latched = addr, True
            return True
        return False

    # Sending -----------------------------------------------------------------------------------

    @property
    def queued_frames(self) -> int:
        return len(self._queue) + (1 if self._partial else 0)

    def enqueue(self, pcm: bytes) -> None:
        """Queue 8 kHz int16 PCM for sending, in 20 ms packets."""
        if self._closed:
            return
        self._partial.extend(pcm)
        while len(self._partial) >= FRAME_BYTES:
            self._queue.append(bytes(self._partial[:FRAME_BYTES]))
            del self._partial[:FRAME_BYTES]

    async def play(self, pcm: bytes, ahead: int = 1) -> bool:
        """Queue audio and wait until at most `ahead` packets wait to be sent, so the caller of
        this method runs in real time. False once the session is closed."""
        self.enqueue(pcm)
        while not self._closed and len(self._queue) > ahead:
            self._room.clear()
            await self._room.wait()
        return not self._closed

    def drop_queued(self) -> int:
        """Barge-in: forget every queued frame; the next packet out is silence. Returns how many."""
        dropped = self.queued_frames
        self._queue.clear()
        self._partial.clear()
        self._room.set()
        return dropped

    async def drain(self, timeout: float = 0.5) -> None:
        """Wait (bounded) until what is queued has gone out."""
        deadline = time.monotonic() + timeout
        while self.queued_frames and not self._closed and time.monotonic() < deadline:
            await asyncio.sleep(PTIME / 2)

    async def send_dtmf(self, digit: str) -> bool:
        """Send one key press as RFC 4733 events; True once its packets are out. False when the
        peer did not negotiate telephone-event or the session closed first."""
        if self.telephone_event_pt is None or self._closed:
            return False
        done = asyncio.get_running_loop().create_future()
        self._dtmf_digits.append((digit, done))
        return await done

    def _next_packet(self) -> RtpPacket | None:
        """Our packet for this tick, or None to send nothing (on hold)."""
        if self._dtmf_train or self._dtmf_digits:
            if not self._dtmf_train:
                digit, self._dtmf_done = self._dtmf_digits.popleft()
                # Built when it starts: a key press is stamped with the RTP time it begins at.
                pt, ssrc, seq, ts = self.telephone_event_pt, self._ssrc, self._seq, self._timestamp
                try:
                    self._dtmf_train.extend(
                        dtmf_packets(digit, payload_type=pt, ssrc=ssrc, seq=seq, timestamp=ts)
                    )
                except ValueError:
                    self._dtmf_done.set_result(False)
                    return self._audio_packet()
            packet = self._dtmf_train.popleft()
            if not self._dtmf_train and not self._dtmf_done.done():
                self.dtmf_out += 1
                self._dtmf_done.set_result(True)
            self._talking = False  # audio after a key press starts a new talkspurt
            return packet
        return self._audio_packet()

    def _audio_packet(self) -> RtpPacket:
        if not self._queue and self._partial:
            self._queue.append(bytes(self._partial).ljust(FRAME_BYTES, b"\0"))
            self._partial.clear()
        if self._queue:
            payload = self._encode(self._queue.popleft())
            marker = not self._talking
            self._talking = True
        else:
            # Idle: send silence rather than nothing. Trunks and PBXs hang up on a stream that stops
            # (their RTP timeout), NATs close the pinhole, and a symmetric-RTP peer needs our packets.
            payload = bytes([self._silence_byte]) * SAMPLES_PER_FRAME
            marker, self._talking = False, False
        self._room.set()
        return RtpPacket(self._codec_pt, int(marker), self._seq, self._timestamp, self._ssrc, payload)

    def _send_tick(self) -> None:
        packet = self._next_packet()
        self._timestamp = (self._timestamp + SAMPLES_PER_FRAME) % (1 << 32)
        if not self._sending or self.remote is None or self._rtp is None:
            # On hold the clock still runs and queued audio is consumed in real time (not sent),
            # so the agent's pipeline keeps its pace; sequence numbers only count packets sent.
            return
        try:
            self._rtp.sendto(packet.serialize(), self.remote)
        except (OSError, ValueError, OverflowError) as exc:  # the SDP was checked; this is a last guard
            self._note_once("send", f"cannot send to {self.remote}: {exc}")
            return
        self._seq = (self._seq + 1) % (1 << 16)
        self.packets_out += 1

    # The clock ---------------------------------------------------------------------------------

    async def _clock(self) -> None:
        loop = asyncio.get_running_loop()
        start, n = loop.time(), 0
        while not self._closed:
            self._send_tick()
            await self._receive_tick()
            n += 1
            delay = start + n * PTIME - loop.time()
            if delay < -MAX_LATENESS:
                start, n, delay = loop.time(), 0, 0.0
            await asyncio.sleep(max(0.0, delay))

    async def _receive_tick(self) -> None:
        if self.on_audio is None or self._decode is None:
            return
        # Packets are popped as the 20 ms output needs them, so a peer sending 10 or 30 ms packets
        # (ptime is only a preference) is played at its real rate, none of it cut.
        while self._receiving and len(self._received) < FRAME_BYTES:
            payload = self.jitter.pop()
            if payload is None:
                break
            self._received += np.asarray(self._decode(payload), dtype=np.int16).tobytes()
        if len(self._received) >= FRAME_BYTES:
            pcm = bytes(self._received[:FRAME_BYTES])
            del self._received[:FRAME_BYTES]
        else:
            # Loss or a pause: the jitter buffer's concealment is silence.
            pcm = bytes(self._received).ljust(FRAME_BYTES, b"\0")
            self._received.clear()
        await self._deliver(pcm)
        # After a stall of this loop the peer's packets pile up past the buffer's depth, and played one
        # per tick they would delay everything the caller says from then on (barge-in included) by
        # the stall's length. Hand the backlog on now: the pipeline takes audio faster than real time.
        while self._receiving and self.jitter.buffered > self.jitter.start_depth:
            payload = self.jitter.pop()
            if payload is None:
                break
            self.caught_up += 1
            await self._deliver(np.asarray(self._decode(payload), dtype=np.int16).tobytes())

    async def _deliver(self, pcm: bytes) -> None:
        try:
            await self.on_audio(pcm)
        except Exception:
            self._note_once("callback", "audio callback failed")
            logger.exception(f"RTP {self.name}: audio callback failed")
