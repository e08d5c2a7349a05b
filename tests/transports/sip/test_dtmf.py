"""RFC 4733 telephone-events: payload round trip, sending a key press, receiving it once."""

import random

import pytest
from aiortc.rtp import RtpPacket

from transports.sip.dtmf import DTMF_DIGITS, DtmfEvent, DtmfReceiver, dtmf_packets

TE_PT = 101


def test_payload_layout():
    # Digit 5, E bit set, volume 10, duration 1280 (160 ms at 8 kHz).
    event = DtmfEvent.parse(bytes.fromhex("058a0500"))
    assert event == DtmfEvent(event=5, end=True, volume=10, duration=1280)
    assert event.digit == "5"
    assert bytes(event) == bytes.fromhex("058a0500")


def test_reserved_bit_is_ignored():
    assert DtmfEvent.parse(bytes.fromhex("0b4a00a0")) == DtmfEvent(event=11, volume=10, duration=160)


@pytest.mark.parametrize("digit", list(DTMF_DIGITS))
def test_every_digit_round_trips(digit):
    event = DtmfEvent.for_digit(digit, end=True, volume=7, duration=800)
    assert DtmfEvent.parse(bytes(event)) == event
    assert event.digit == digit
    assert event.event == DTMF_DIGITS.index(digit)


def test_flash_event_is_not_a_digit():
    assert DtmfEvent.parse(bytes([16, 10, 0, 160])).digit is None


@pytest.mark.parametrize("payload", [b"", b"\x05\x0a\x00", b"\x05\x0a\x00\xa0\x00", bytes(8)])
def test_bad_payload_length_raises(payload):
    with pytest.raises(ValueError):
        DtmfEvent.parse(payload)


@pytest.mark.parametrize("digit", ["", "55", "E", "x"])
def test_unknown_digit_raises(digit):
    with pytest.raises(ValueError):
        DtmfEvent.for_digit(digit)


def test_packet_train_shape():
    packets = dtmf_packets("#", payload_type=TE_PT, ssrc=0xCAFE, seq=65534, timestamp=48000)
    wire = [RtpPacket.parse(p.serialize()) for p in packets]
    events = [DtmfEvent.parse(p.payload) for p in wire]
    assert [p.marker for p in wire] == [1] + [0] * 9
    assert [p.sequence_number for p in wire] == [65534, 65535] + list(range(8))
    assert {p.timestamp for p in wire} == {48000}
    assert {p.payload_type for p in wire} == {TE_PT}
    assert [e.duration for e in events] == [160, 320, 480, 640, 800, 960, 1120, 1280, 1280, 1280]
    assert [e.end for e in events] == [False] * 7 + [True] * 3
    assert {e.digit for e in events} == {"#"}


def test_bad_duration_raises():
    with pytest.raises(ValueError):
        dtmf_packets("1", payload_type=TE_PT, ssrc=1, seq=0, timestamp=0, duration_ms=0)
    with pytest.raises(ValueError):
        dtmf_packets("1", payload_type=TE_PT, ssrc=1, seq=0, timestamp=0, duration_ms=9000)


def press_train(digits: str) -> list[RtpPacket]:
    """Packets for a run of key presses, 300 ms apart, as they leave the sender."""
    packets, seq = [], 1000
    for i, digit in enumerate(digits):
        press = dtmf_packets(digit, payload_type=TE_PT, ssrc=7, seq=seq, timestamp=1_000_000 + 2400 * i)
        seq += len(press)
        packets += [RtpPacket.parse(p.serialize()) for p in press]
    return packets


def test_receiver_reports_each_press_once():
    receiver = DtmfReceiver()
    reported = [receiver.feed_packet(p) for p in press_train(DTMF_DIGITS)]
    assert [d for d in reported if d is not None] == list(DTMF_DIGITS)
    assert receiver.digits == list(DTMF_DIGITS)


def test_repeated_key_is_two_presses():
    receiver = DtmfReceiver()
    for p in press_train("55"):
        receiver.feed(p.timestamp, p.payload, bool(p.marker))
    assert receiver.digits == ["5", "5"]


def test_shuffled_and_duplicated_train_reports_each_press_once():
    rng = random.Random(4733)
    receiver = DtmfReceiver()
    for digit in DTMF_DIGITS:
        packets = dtmf_packets(digit, payload_type=TE_PT, ssrc=7, seq=0, timestamp=8000 * (ord(digit)))
        copy = packets + rng.sample(packets, len(packets) // 2)
        rng.shuffle(copy)
        for p in copy:
            receiver.feed_packet(p)
    assert receiver.digits == list(DTMF_DIGITS)


def test_press_is_reported_when_first_packets_are_lost():
    receiver = DtmfReceiver()
    packets = dtmf_packets("9", payload_type=TE_PT, ssrc=7, seq=0, timestamp=0)
    for p in packets[-3:]:  # only the end packets arrive
        receiver.feed_packet(p)
    assert receiver.digits == ["9"]
