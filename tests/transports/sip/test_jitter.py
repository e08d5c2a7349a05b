"""Jitter buffer for G.711 RTP: ordering, late/duplicate drops, loss, wrap-around, stream resets."""

import pytest
from aiortc.rtp import RtpPacket

from transports.sip.jitter import JitterBuffer, seq_delta

PTIME = 0.02
SSRC = 0x5EED1234


def rtp(seq: int, *, ssrc: int = SSRC, first_seq: int = 0) -> RtpPacket:
    """A PCMU packet as a phone sends it, round-tripped through the wire format."""
    index = (seq - first_seq) % 65536
    packet = RtpPacket(
        payload_type=0,
        marker=1 if index == 0 else 0,
        sequence_number=seq % 65536,
        timestamp=(160 * index + 0x1000) % (1 << 32),
        ssrc=ssrc,
        payload=bytes([index % 256]) * 160,
    )
    return RtpPacket.parse(packet.serialize())


def label(payload: bytes | None) -> int | None:
    return None if payload is None else payload[0]


def run(buffer: JitterBuffer, arrivals: list[list[RtpPacket]], extra_ticks: int = 5) -> list[int | None]:
    """Feed one list of packets per ptime tick, pop once per tick, and return what played."""
    played = []
    for tick, packets in enumerate(arrivals + [[]] * extra_ticks):
        for packet in packets:
            buffer.push(packet, tick * PTIME)
        played.append(label(buffer.pop()))
    return played


def playing(played: list[int | None]) -> list[int | None]:
    """What played after the prebuffer delay and before the tail of empty ticks."""
    start = next(i for i, p in enumerate(played) if p is not None)
    end = max(i for i, p in enumerate(played) if p is not None)
    return played[start : end + 1]


def test_seq_delta_wraps():
    assert seq_delta(0, 65535) == 1
    assert seq_delta(65535, 0) == -1
    assert seq_delta(10, 5) == 5


def test_in_order_stream_plays_in_order_after_depth():
    buffer = JitterBuffer(depth_packets=3)
    played = run(buffer, [[rtp(i)] for i in range(20)])
    assert played[:2] == [None, None]  # prebuffering
    assert playing(played) == list(range(20))
    assert (buffer.received, buffer.played, buffer.lost, buffer.late) == (20, 20, 0, 0)
    assert buffer.jitter_ms == pytest.approx(0.0)


def test_swapped_pairs_are_reordered():
    order = [1, 0, 3, 2, 5, 4, 7, 6, 9, 8]
    buffer = JitterBuffer()
    played = run(buffer, [[rtp(i)] for i in order])
    assert playing(played) == list(range(10))
    assert buffer.reordered == 5
    assert buffer.lost == 0
    assert buffer.jitter > 0


def test_late_packet_is_dropped_and_counted():
    arrivals = [[rtp(i)] for i in range(10)]
    arrivals[4] = []
    arrivals[9].append(rtp(4))  # arrives long after its turn was concealed
    buffer = JitterBuffer()
    played = run(buffer, arrivals)
    assert playing(played) == [0, 1, 2, 3, None, 5, 6, 7, 8, 9]
    assert (buffer.late, buffer.lost, buffer.played) == (1, 1, 9)


def test_duplicates_are_dropped():
    arrivals = [[rtp(i), rtp(i)] for i in range(6)]
    arrivals[5].append(rtp(0))  # a copy of a packet already played
    buffer = JitterBuffer()
    played = run(buffer, arrivals)
    assert playing(played) == list(range(6))
    assert buffer.duplicate == 7
    assert buffer.late == 0


def test_burst_loss_is_concealed_and_playback_continues():
    arrivals = [[rtp(i)] if not 10 <= i < 15 else [] for i in range(30)]
    buffer = JitterBuffer()
    played = run(buffer, arrivals)
    assert playing(played) == list(range(10)) + [None] * 5 + list(range(15, 30))
    assert (buffer.lost, buffer.played) == (5, 25)


def test_single_loss_inside_buffer_is_concealed_in_place():
    arrivals = [[rtp(i)] if i != 6 else [] for i in range(12)]
    buffer = JitterBuffer()
    assert playing(run(buffer, arrivals)) == [0, 1, 2, 3, 4, 5, None, 7, 8, 9, 10, 11]
    assert buffer.lost == 1


def test_short_talk_spurt_below_depth_still_plays():
    buffer = JitterBuffer(depth_packets=3)
    assert playing(run(buffer, [[rtp(0)], [rtp(1)]])) == [0, 1]


def test_wrap_around_plays_in_order():
    seqs = [65532 + i for i in range(10)]  # 65532 .. 65535, 0 .. 5
    arrivals = [[rtp(s, first_seq=65532)] for s in seqs]
    arrivals[3], arrivals[4] = arrivals[4], arrivals[3]  # 0 before 65535
    buffer = JitterBuffer()
    assert playing(run(buffer, arrivals)) == list(range(10))
    assert (buffer.lost, buffer.late, buffer.reordered) == (0, 0, 1)


def test_ssrc_change_resets_to_the_new_stream():
    other = 0x0BADF00D
    arrivals = [[rtp(i)] for i in range(5)] + [
        [rtp(30000 + i, ssrc=other, first_seq=30000)] for i in range(8)
    ]
    buffer = JitterBuffer()
    played = run(buffer, arrivals)
    # Stream A's unplayed tail is dropped; stream B plays from its first packet, not as late.
    assert playing(played) == [0, 1, 2, None, None] + list(range(8))
    assert buffer.resets == 1
    assert buffer.late == 0


def test_large_sequence_jump_resets():
    arrivals = [[rtp(i)] for i in range(5)] + [[rtp(20000 + i, first_seq=20000)] for i in range(6)]
    buffer = JitterBuffer(max_packets=50)
    played = run(buffer, arrivals)
    assert playing(played)[-6:] == list(range(6))
    assert buffer.resets == 1
    assert buffer.lost == 0


def test_buffer_never_grows_past_max_packets():
    buffer = JitterBuffer(depth_packets=2, max_packets=8)
    for i in range(20):
        buffer.push(rtp(i), 0.0)
    assert buffer.buffered == 8
    assert [label(buffer.pop()) for _ in range(3)] == [12, 13, 14]


def test_start_depth_grows_with_measured_jitter_and_applies_at_the_next_start():
    buffer = JitterBuffer(depth_packets=2, max_depth=6)
    steady = JitterBuffer(depth_packets=2, max_depth=6)
    for seq in range(40):
        # the same stream, on time vs. arriving up to 30 ms early or late
        steady.push(rtp(seq), seq * PTIME)
        buffer.push(rtp(seq), seq * PTIME + (0.03 if seq % 2 else -0.03))
    assert steady.start_depth == 2
    assert 2 < buffer.start_depth <= 6
    # playback starts only once that larger depth is buffered
    buffer = JitterBuffer(depth_packets=2, max_depth=6)
    buffer.jitter = 0.02 * 8000  # 20 ms measured: room for 3 x 20 ms, so 4 packets
    assert buffer.start_depth == 4
    played = []
    for seq in range(6):
        buffer.push(rtp(seq), seq * PTIME)  # on time: the estimate decays only slowly
        played.append(label(buffer.pop()))
    assert played == [None, None, None, 0, 1, 2]


def dtmf(seq: int, *, ssrc: int = SSRC) -> RtpPacket:
    """An RFC 4733 event packet of the same stream: same SSRC, next sequence number, PT 101."""
    packet = RtpPacket(
        payload_type=101, sequence_number=seq % 65536, timestamp=0x1000, ssrc=ssrc, payload=b"\x05\x0a\x00\xa0"
    )
    return RtpPacket.parse(packet.serialize())


def test_sequence_numbers_taken_by_rfc4733_events_are_not_lost():
    # Audio 0-9, a key press as events 10-19 (no audio meanwhile, as phones do), audio 20-29.
    buffer = JitterBuffer(depth_packets=2)
    arrivals = [[rtp(i)] for i in range(10)] + [[dtmf(i)] for i in range(10, 20)] + [[rtp(i)] for i in range(20, 30)]
    for tick, packets in enumerate(arrivals + [[]] * 5):
        for packet in packets:
            if packet.payload_type == 0:
                buffer.push(packet, tick * PTIME)
            else:
                buffer.skip(packet)
        buffer.pop()
    assert (buffer.played, buffer.lost, buffer.late) == (20, 0, 0)


def test_events_interleaved_with_audio_are_skipped_without_loss_and_real_loss_still_counts():
    buffer = JitterBuffer(depth_packets=2)
    # Audio and events alternate (a sender that keeps audio going during the press), 15 is lost.
    played = []
    for tick, seq in enumerate(range(0, 30)):
        if seq % 3 == 1:
            buffer.skip(dtmf(seq))
        elif seq != 15:
            buffer.push(rtp(seq), tick * PTIME)
        played.append(label(buffer.pop()))
    for _ in range(10):
        played.append(label(buffer.pop()))
    audio = [s for s in range(30) if s % 3 != 1 and s != 15]
    assert [p for p in played if p is not None] == audio
    assert buffer.lost == 1


def test_events_across_the_sequence_wrap_are_not_lost():
    buffer = JitterBuffer(depth_packets=2)
    seqs = range(65530, 65550)
    for tick, seq in enumerate(seqs):
        if 65534 <= seq < 65540:
            buffer.skip(dtmf(seq))
        else:
            buffer.push(rtp(seq, first_seq=65530), tick * PTIME)
        buffer.pop()
    for _ in range(10):
        buffer.pop()
    assert (buffer.played, buffer.lost) == (14, 0)
