"""RtpSession against plain UDP sockets on 127.0.0.1: ports, pacing, marker bit, symmetric RTP,
DTMF both ways, barge-in drop, hostile datagrams and hold."""

import asyncio
import random
import socket
import time

import numpy as np
import pytest
from aiortc.rtp import RtpPacket

from processors.audio import ulaw_decode, ulaw_encode
from transports.sip.dtmf import DtmfEvent, dtmf_packets
from transports.sip.rtp import NoFreePort, PortPool, RtpSession
from transports.sip.sdp import negotiate

HOST = "127.0.0.1"
TONE = (np.sin(np.arange(160) * 2 * np.pi * 440 / 8000) * 8000).astype(np.int16).tobytes()


def pool(pairs: int = 8) -> PortPool:
    first = random.randrange(30000, 60000 - 2 * pairs, 2)
    return PortPool(HOST, first, first + 2 * pairs - 1)


def offer(port: int, direction: str = "sendrecv", codec: str = "PCMU") -> str:
    pt = 0 if codec == "PCMU" else 8
    return (
        f"v=0\r\no=peer 1 1 IN IP4 {HOST}\r\ns=-\r\nc=IN IP4 {HOST}\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP {pt} 101\r\na=rtpmap:{pt} {codec}/8000\r\n"
        f"a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\na={direction}\r\n"
    )


class Peer(asyncio.DatagramProtocol):
    """The far end: records every packet with its arrival time."""

    def __init__(self):
        self.packets: list[tuple[float, RtpPacket]] = []
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.packets.append((time.monotonic(), RtpPacket.parse(data)))

    @property
    def port(self) -> int:
        return self.transport.get_extra_info("sockname")[1]

    def send(self, data: bytes, port: int) -> None:
        self.transport.sendto(data, (HOST, port))


async def peer() -> Peer:
    _, protocol = await asyncio.get_running_loop().create_datagram_endpoint(Peer, local_addr=(HOST, 0))
    return protocol


async def wait_for(condition, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)


async def session_with_peer(direction: str = "sendrecv", **kwargs) -> tuple[RtpSession, Peer]:
    far = await peer()
    session = await RtpSession.open(pool(), **kwargs)
    session.configure(negotiate(offer(far.port, direction), local_ip=HOST, local_port=session.port))
    session.start()
    return session, far


def audio_packet(seq: int, payload: bytes = b"\xff" * 160, pt: int = 0, ssrc: int = 77) -> bytes:
    return RtpPacket(
        payload_type=pt, sequence_number=seq, timestamp=seq * 160, ssrc=ssrc, payload=payload
    ).serialize()


def is_tone(packet: RtpPacket) -> bool:
    return packet.payload_type == 0 and np.abs(ulaw_decode(packet.payload)).max() > 1000


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((HOST, port))
            return True
        except OSError:
            return False


async def test_pool_hands_out_even_ports_binds_the_rtcp_port_and_takes_both_back():
    ports = PortPool(HOST, 40001, 40006)  # pairs 40002/3 and 40004/5; 40006 has no partner
    assert [ports.take(), ports.take()] == [40002, 40004]
    with pytest.raises(NoFreePort):
        ports.take()
    ports.give_back(40002)
    assert ports.take() == 40002

    small = pool(pairs=1)
    session = await RtpSession.open(small)
    assert session.port % 2 == 0
    assert not port_is_free(session.port) and not port_is_free(session.port + 1)
    with pytest.raises(NoFreePort):
        await RtpSession.open(small)
    session.close()
    session.close()  # idempotent
    assert small.in_use == set()
    await asyncio.sleep(0.01)  # asyncio closes a datagram socket on the loop's next turn
    assert port_is_free(session.port) and port_is_free(session.port + 1)


async def test_output_is_paced_at_50_packets_a_second_with_continuous_seq_ts_and_ssrc():
    session, far = await session_with_peer()
    try:
        await asyncio.sleep(1.0)
    finally:
        session.close()
    packets = [p for _, p in far.packets]
    assert 35 <= len(packets) <= 65, len(packets)
    for a, b in zip(packets, packets[1:], strict=False):
        assert b.sequence_number == (a.sequence_number + 1) % 65536
        assert b.timestamp == (a.timestamp + 160) % (1 << 32)
        assert b.ssrc == a.ssrc
    # Idle: mu-law line silence, not nothing.
    assert all(p.payload == b"\xff" * 160 and p.payload_type == 0 for p in packets)


async def test_marker_bit_starts_each_talkspurt():
    session, far = await session_with_peer()
    try:
        await asyncio.sleep(0.1)
        session.enqueue(TONE * 5)
        await asyncio.sleep(0.25)
        session.enqueue(TONE * 3)
        await asyncio.sleep(0.15)
    finally:
        session.close()
    packets = [p for _, p in far.packets]
    tone = [i for i, p in enumerate(packets) if is_tone(p)]
    assert len(tone) == 8
    marked = [i for i, p in enumerate(packets) if p.marker]
    assert marked == [tone[0], tone[5]]


async def test_symmetric_rtp_answers_where_the_packets_come_from():
    session, sdp_peer = await session_with_peer()
    natted, stranger = await peer(), await peer()
    try:
        natted.send(audio_packet(1), session.port)
        await wait_for(lambda: len(natted.packets) >= 3)
        before = len(sdp_peer.packets)
        stranger.send(audio_packet(1, ssrc=99), session.port)  # a third party, while the peer is live
        natted.send(audio_packet(2), session.port)
        await asyncio.sleep(0.1)
    finally:
        session.close()
    assert session.remote == (HOST, natted.port) and session.latched
    assert len(sdp_peer.packets) <= before + 1  # at most one in flight when the latch moved
    assert stranger.packets == [] and session.foreign == 1


async def test_dtmf_received_once_per_press_and_sent_as_rfc4733_events():
    digits = []

    async def on_dtmf(digit):
        digits.append(digit)

    session, far = await session_with_peer(on_dtmf=on_dtmf)
    try:
        for packet in dtmf_packets("5", payload_type=101, ssrc=5, seq=100, timestamp=16000):
            far.send(packet.serialize(), session.port)
        await wait_for(lambda: digits)
        assert await asyncio.wait_for(session.send_dtmf("7"), 2.0) is True
        await asyncio.sleep(0.05)
    finally:
        session.close()
    assert digits == ["5"] and session.dtmf_in == 1
    events = [p for _, p in far.packets if p.payload_type == 101]
    parsed = [DtmfEvent.parse(p.payload) for p in events]
    assert {e.digit for e in parsed} == {"7"}
    assert len({p.timestamp for p in events}) == 1 and events[0].marker == 1
    assert [e.end for e in parsed][-3:] == [True] * 3 and not parsed[0].end
    seqs = [p.sequence_number for _, p in far.packets]
    assert all(b == (a + 1) % 65536 for a, b in zip(seqs, seqs[1:], strict=False))


async def test_drop_queued_stops_our_audio_within_one_packet():
    session, far = await session_with_peer()
    try:
        session.enqueue(TONE * 50)
        await wait_for(lambda: sum(is_tone(p) for _, p in far.packets) >= 5)
        dropped_at = time.monotonic()
        assert session.drop_queued() > 30
        await asyncio.sleep(0.2)
    finally:
        session.close()
    after = [(t, p) for t, p in far.packets if t > dropped_at]
    tone_after = [t for t, p in after if is_tone(p)]
    assert len(tone_after) <= 1
    assert len(after) >= 5 and not is_tone(after[-1][1])  # the stream goes on, as silence


async def test_garbage_is_counted_and_dropped_and_the_call_goes_on():
    heard = []

    async def on_audio(pcm):
        heard.append(pcm)

    session, far = await session_with_peer(on_audio=on_audio)
    try:
        for junk in (b"hello", b"\x00" * 12, b"\x40" + b"\x00" * 20, audio_packet(1, pt=96), b"\x80" * 2000):
            far.send(junk, session.port)
        far.send(
            RtpPacket(payload_type=101, sequence_number=9, ssrc=3, payload=b"\x01").serialize(), session.port
        )
        for seq in range(10, 20):
            far.send(audio_packet(seq, ulaw_encode(TONE)), session.port)
        await wait_for(lambda: any(np.abs(np.frombuffer(p, np.int16)).max() > 1000 for p in heard))
    finally:
        session.close()
    assert session.bad == 6
    assert session.packets_in == 10
    assert all(len(p) == 320 for p in heard)


async def test_on_hold_nothing_is_sent_and_resume_continues_the_sequence():
    session, far = await session_with_peer()
    try:
        await wait_for(lambda: len(far.packets) >= 3)
        session.configure(negotiate(offer(far.port, "sendonly"), local_ip=HOST, local_port=session.port))
        assert session.on_hold
        await asyncio.sleep(0.05)
        held_from = len(far.packets)
        session.enqueue(TONE * 10)  # the agent talking while held is consumed, not sent
        await asyncio.sleep(0.3)
        held = far.packets[held_from:]
        last_seq = far.packets[-1][1].sequence_number
        session.configure(negotiate(offer(far.port, "sendrecv"), local_ip=HOST, local_port=session.port))
        await wait_for(lambda: len(far.packets) > held_from + len(held) + 2)
    finally:
        session.close()
    assert held == []
    resumed = far.packets[held_from][1]
    assert resumed.sequence_number == (last_seq + 1) % 65536
    assert not any(is_tone(p) for _, p in far.packets[held_from:])


async def test_a_peer_with_30_ms_packets_is_played_whole_at_its_own_rate():
    heard = []

    async def on_audio(pcm):
        heard.append(np.frombuffer(pcm, np.int16))

    session, far = await session_with_peer(on_audio=on_audio)
    tone = np.tile(np.frombuffer(TONE, np.int16), 3)[:240].tobytes()  # 30 ms
    try:
        start = time.monotonic()
        for seq in range(20):
            far.send(audio_packet(seq, ulaw_encode(tone)), session.port)
            await asyncio.sleep(max(0.0, start + (seq + 1) * 0.03 - time.monotonic()))
        await asyncio.sleep(0.2)
    finally:
        session.close()
    audio = np.concatenate(heard)
    assert all(chunk.size == 160 for chunk in heard)
    assert abs(int((np.abs(audio) > 200).sum()) - 20 * 240) <= 240  # all 600 ms, none cut or doubled


async def test_a_backlog_left_by_a_stalled_loop_is_handed_on_at_once_not_kept_as_delay():
    heard = []

    async def on_audio(pcm):
        heard.append((time.monotonic(), np.frombuffer(pcm, np.int16)))

    session, far = await session_with_peer(on_audio=on_audio)
    tone = ulaw_encode(np.frombuffer(TONE, np.int16)[:160])
    try:
        for seq in range(3):  # a steady start
            far.send(audio_packet(seq, tone), session.port)
            await asyncio.sleep(0.02)
        await wait_for(lambda: session.jitter.played >= 3)
        time.sleep(0.5)  # the event loop stalls (a busy thread holding it): 25 packets arrive meanwhile
        stalled_at = time.monotonic()
        for seq in range(3, 28):
            far.send(audio_packet(seq, tone), session.port)
        await wait_for(lambda: session.jitter.played >= 28, timeout=2.0)
        drained_at = time.monotonic()
    finally:
        session.close()
    # one packet a tick would take 0.5 s to play the backlog; handed on, it is done in a few ticks
    assert drained_at - stalled_at < 0.2
    assert session.caught_up >= 15
    loud = sum(int((np.abs(pcm) > 200).sum() > 0) for _, pcm in heard)
    assert loud >= 27  # nothing the caller said was dropped


async def test_a_key_press_in_the_callers_stream_is_not_counted_as_lost_audio():
    # The phone numbers its RFC 4733 packets in the audio's sequence (same SSRC), sending no audio
    # meanwhile: the jump in the audio's numbering is the key press, not loss.
    digits = []

    async def on_dtmf(digit):
        digits.append(digit)

    session, far = await session_with_peer(on_dtmf=on_dtmf, on_audio=lambda pcm: asyncio.sleep(0))
    tone = ulaw_encode(np.frombuffer(TONE, np.int16)[:160])
    press = dtmf_packets("5", payload_type=101, ssrc=77, seq=10, timestamp=1600)
    after = 10 + len(press)
    try:
        start = time.monotonic()
        wire = [audio_packet(s, tone) for s in range(10)] + [p.serialize() for p in press]
        wire += [audio_packet(s, tone) for s in range(after, after + 10)]
        for n, data in enumerate(wire):
            far.send(data, session.port)
            await asyncio.sleep(max(0.0, start + (n + 1) * 0.02 - time.monotonic()))
        await wait_for(lambda: session.jitter.played >= 20)
        stats = session.stats()
    finally:
        session.close()
    assert digits == ["5"] and session.dtmf_in == 1
    assert (stats["lost"], stats["late"], stats["bad"]) == (0, 0, 0)
