"""A small SIP phone (UAC) over UDP: dials one call, streams the caller's audio as paced G.711 RTP,
records every RTP packet that comes back with its arrival time, sends RFC 4733 DTMF and hangs up.

Benchmarks and conversational tests use it to call an agent over the real wire and time what the
caller would hear; it can dial any SIP user agent server that answers with PCMU or PCMA.

    caller = SipCaller("127.0.0.1", 5060)
    await caller.dial()
    onset = await caller.say(pcm_8k)          # when its first packet left
    await asyncio.sleep(5)
    await caller.hang_up()
    caller.received                           # [(arrival, seq, payload), ...]
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from aiortc.rtp import RtpPacket
from loguru import logger

from processors.audio import alaw_decode, alaw_encode, ulaw_decode, ulaw_encode

from .dtmf import dtmf_packets
from .message import SipMessage, SipRequest, SipResponse, new_branch, new_tag
from .rtp import PTIME
from .rtp import SAMPLES_PER_FRAME as FRAME  # 20 ms at 8 kHz, one byte per sample

T1 = 0.5
CODECS = {0: ("PCMU", ulaw_encode, ulaw_decode, 0xFF), 8: ("PCMA", alaw_encode, alaw_decode, 0xD5)}
DTMF_PT = 101


class SipCallFailed(RuntimeError):
    def __init__(self, status: int | None, reason: str):
        super().__init__(f"call failed: {status or 'no answer'} {reason}".strip())
        self.status = status


@dataclass
class Received:
    arrival: float
    seq: int
    payload_type: int
    payload: bytes


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, on_datagram):
        self.on_datagram = on_datagram

    def datagram_received(self, data, addr):
        try:
            self.on_datagram(data, addr)
        except Exception:  # a bad datagram must not end the caller's socket
            logger.exception("SIP caller: datagram handling failed")


@dataclass
class _Outgoing:
    frames: deque = field(default_factory=deque)  # (label, payload, started future) per queued 20 ms
    seq: int = field(default_factory=lambda: random.randrange(1 << 16))
    timestamp: int = field(default_factory=lambda: random.randrange(1 << 32))
    ssrc: int = field(default_factory=lambda: random.randrange(1, 1 << 32))


class SipCaller:
    def __init__(self, host: str, port: int, *, user: str = "agent", local_host: str = "127.0.0.1", payload_type: int = 0):
        if payload_type not in CODECS:
            raise ValueError(f"payload_type {payload_type} is not PCMU (0) or PCMA (8)")
        self.target = (host, port)
        self.user = user
        self.local_host = local_host
        self.payload_type = payload_type
        self.call_id = f"{new_tag()}@{local_host}"
        self.from_tag = new_tag()
        self.to_header: str | None = None
        self.remote_rtp: tuple[str, int] | None = None
        self.received: list[Received] = []
        self.onsets: dict[str, float] = {}  # label -> when its first packet was sent
        self.ended_by_peer = asyncio.Event()
        self.answered_at: float | None = None
        self._cseq = itertools.count(1)
        self._out = _Outgoing()
        self._waiters: dict[tuple[int, str], asyncio.Future] = {}
        self._sip = self._rtp = None
        self._clock_task: asyncio.Task | None = None
        self._remote_target: str | None = None

    # -- signalling ---------------------------------------------------------------------------

    async def dial(self, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        self._sip, _ = await loop.create_datagram_endpoint(lambda: _Endpoint(self._on_sip), local_addr=(self.local_host, 0))
        self._rtp, _ = await loop.create_datagram_endpoint(lambda: _Endpoint(self._on_rtp), local_addr=(self.local_host, 0))
        invite = self._request("INVITE", f"sip:{self.user}@{self.target[0]}:{self.target[1]}", body=self._offer())
        try:
            response = await self._transact(invite, timeout)
        except BaseException:
            self.close()
            raise
        if response.status != 200:
            self.close()
            raise SipCallFailed(response.status, response.reason)
        self.answered_at = time.monotonic()
        self.to_header = response.header("To")
        contact = response.contact_uri
        self._remote_target = str(contact) if contact else invite.uri
        self.remote_rtp = _sdp_address(response.body.decode(errors="replace"))
        self._send(self._ack(response))
        self._clock_task = asyncio.create_task(self._clock(), name=f"sip-caller-rtp-{self.call_id}")

    async def hang_up(self, timeout: float = 5.0) -> int | None:
        """Send BYE; the status of the answer (None if the peer never answered)."""
        self._stop_clock()
        status = None
        if self.to_header and not self.ended_by_peer.is_set():
            try:
                status = (await self._transact(self._request("BYE", self._remote_target), timeout)).status
            except TimeoutError:
                pass
        self.close()
        return status

    def close(self) -> None:
        self._stop_clock()
        for transport in (self._sip, self._rtp):
            if transport is not None:
                transport.close()

    def _request(self, method: str, uri: str, body: bytes = b"") -> SipRequest:
        host, port = self._sip.get_extra_info("sockname")[:2]
        cseq = next(self._cseq)
        headers = [
            ("Via", f"SIP/2.0/UDP {host}:{port};branch={new_branch()};rport"),
            ("Max-Forwards", "70"),
            ("From", f"<sip:caller@{host}:{port}>;tag={self.from_tag}"),
            ("To", self.to_header or f"<sip:{self.user}@{self.target[0]}:{self.target[1]}>"),
            ("Call-ID", self.call_id),
            ("CSeq", f"{cseq} {method}"),
            ("Contact", f"<sip:caller@{host}:{port}>"),
        ]
        if body:
            headers.append(("Content-Type", "application/sdp"))
        return SipRequest(method, uri, headers, body)

    def _ack(self, response: SipResponse) -> SipRequest:
        ack = self._request("ACK", self._remote_target)
        ack.headers.set("CSeq", f"{response.cseq.number} ACK")
        return ack

    def _offer(self) -> bytes:
        host, port = self._rtp.get_extra_info("sockname")[:2]
        name = CODECS[self.payload_type][0]
        lines = [
            "v=0", f"o=caller {random.randrange(1 << 31)} 1 IN IP4 {host}", "s=-", f"c=IN IP4 {host}", "t=0 0",
            f"m=audio {port} RTP/AVP {self.payload_type} {DTMF_PT}",
            f"a=rtpmap:{self.payload_type} {name}/8000", f"a=rtpmap:{DTMF_PT} telephone-event/8000",
            f"a=fmtp:{DTMF_PT} 0-15", "a=ptime:20", "a=sendrecv",
        ]
        return ("\r\n".join(lines) + "\r\n").encode()

    async def _transact(self, request: SipRequest, timeout: float) -> SipResponse:
        """Send with UDP retransmission (T1 doubling, §17.1) until a final response or `timeout`."""
        key = (request.cseq.number, request.method)
        future = self._waiters[key] = asyncio.get_running_loop().create_future()
        interval, deadline = T1, time.monotonic() + timeout
        try:
            while True:
                self._send(request)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no final response to {request.method} within {timeout} s")
                try:
                    return await asyncio.wait_for(asyncio.shield(future), min(interval, left))
                except TimeoutError:
                    interval = min(interval * 2, 4.0)
        finally:
            self._waiters.pop(key, None)

    def _send(self, message: SipMessage) -> None:
        self._sip.sendto(bytes(message), self.target)

    def _on_sip(self, data: bytes, addr) -> None:
        if not data.strip():
            return
        message = SipMessage.parse(data)
        if isinstance(message, SipResponse):
            cseq = message.cseq
            if message.status >= 200 and cseq.method == "INVITE" and self.answered_at is not None:
                self._send(self._ack(message))  # our ACK was lost: the 200 comes again
            future = self._waiters.get((cseq.number, cseq.method))
            if future is not None and not future.done() and message.status >= 200:
                future.set_result(message)
            return
        if message.method == "BYE":
            self._sip.sendto(bytes(message.response(200)), addr)
            self._stop_clock()
            self.ended_by_peer.set()
        elif message.method != "ACK":
            self._sip.sendto(bytes(message.response(200 if message.method == "OPTIONS" else 501)), addr)

    # -- media --------------------------------------------------------------------------------

    async def say(self, pcm8k: np.ndarray, label: str | None = None) -> float:
        """Queue caller audio (int16 at 8 kHz); returns when its first packet has left, and that time."""
        encode = CODECS[self.payload_type][1]
        data = encode(np.asarray(pcm8k, dtype=np.int16))
        label = label or f"say-{len(self.onsets) + 1}"
        started = asyncio.get_running_loop().create_future()
        chunks = [data[i : i + FRAME] for i in range(0, len(data), FRAME)]
        for i, chunk in enumerate(chunks):
            silence = bytes([CODECS[self.payload_type][3]])
            self._out.frames.append((label if i == 0 else None, chunk.ljust(FRAME, silence), started if i == 0 else None))
        return await started

    async def send_dtmf(self, digit: str) -> None:
        out = self._out
        packets = dtmf_packets(digit, payload_type=DTMF_PT, ssrc=out.ssrc, seq=out.seq, timestamp=out.timestamp)
        for packet in packets:
            self._rtp.sendto(packet.serialize(), self.remote_rtp)
            await asyncio.sleep(PTIME)
        out.seq = (out.seq + len(packets)) % (1 << 16)
        out.timestamp = (out.timestamp + FRAME * len(packets)) % (1 << 32)

    async def _clock(self) -> None:
        """Caller audio or silence every 20 ms, as a phone does, on an absolute schedule."""
        out, silence = self._out, bytes([CODECS[self.payload_type][3]]) * FRAME
        start, n = time.monotonic(), 0
        while True:
            label, payload, started = out.frames.popleft() if out.frames else (None, silence, None)
            packet = RtpPacket(payload_type=self.payload_type, sequence_number=out.seq, timestamp=out.timestamp, ssrc=out.ssrc, payload=payload)
            if self.remote_rtp is not None:
                self._rtp.sendto(packet.serialize(), self.remote_rtp)
            if label is not None:
                self.onsets[label] = time.monotonic()
                if started is not None and not started.done():
                    started.set_result(self.onsets[label])
            out.seq = (out.seq + 1) % (1 << 16)
            out.timestamp = (out.timestamp + FRAME) % (1 << 32)
            n += 1
            await asyncio.sleep(max(0.0, start + n * PTIME - time.monotonic()))

    def _stop_clock(self) -> None:
        if self._clock_task is not None:
            self._clock_task.cancel()
            self._clock_task = None

    def _on_rtp(self, data: bytes, addr) -> None:
        try:
            packet = RtpPacket.parse(data)
        except ValueError:
            return
        self.received.append(Received(time.monotonic(), packet.sequence_number, packet.payload_type, packet.payload))

    def heard(self, since: float | None = None) -> tuple[np.ndarray, float]:
        """The agent's audio as the caller's phone would play it: packets in arrival order, 20 ms each,
        decoded to int16 at 8 kHz; and the arrival time of the first. Silence fills receive gaps."""
        decode = CODECS[self.payload_type][2]
        packets = [p for p in self.received if p.payload_type == self.payload_type and (since is None or p.arrival >= since)]
        if not packets:
            return np.zeros(0, np.int16), since or 0.0
        t0 = packets[0].arrival
        slots = int(round((packets[-1].arrival - t0) / PTIME)) + 1
        out = np.zeros(slots * FRAME, np.int16)
        for p in packets:
            slot = min(slots - 1, int(round((p.arrival - t0) / PTIME)))
            audio = decode(p.payload)[:FRAME]
            out[slot * FRAME : slot * FRAME + len(audio)] = audio
        return out, t0


def _sdp_address(sdp: str) -> tuple[str, int]:
    """The answer's audio address: the media-level c= if any, else the session-level one."""
    media = re.search(r"^m=audio (\d+) ", sdp, re.M)
    if media is None:
        raise SipCallFailed(200, "answer has no m=audio line")
    hosts = re.findall(r"^c=IN IP[46] (\S+)", sdp, re.M)
    if not hosts:
        raise SipCallFailed(200, "answer has no c= line")
    media_host = re.findall(r"^c=IN IP[46] (\S+)", sdp[media.start() :], re.M)
    return (media_host or hosts)[0], int(media.group(1))
