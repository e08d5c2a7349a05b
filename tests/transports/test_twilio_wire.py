import base64
import json
import random

import numpy as np
import pytest
from loguru import logger

from processors.audio import ulaw_decode, ulaw_encode
from transports.twilio_wire import (
    ERROR_KINDS,
    MAX_PAYLOAD_BYTES,
    Connected,
    Dtmf,
    Mark,
    Media,
    Start,
    Stop,
    TwilioStreamState,
    TwilioWireError,
    parse_message,
)

STREAM = "MZ5f1c0000000000000000000000000001"
CALL = "CA04de0000000000000000000000000002"
ACCOUNT = "AC93b00000000000000000000000000003"


def connected() -> str:
    return json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})


def start(stream: str = STREAM) -> str:
    return json.dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": stream,
            "start": {
                "streamSid": stream,
                "accountSid": ACCOUNT,
                "callSid": CALL,
                "tracks": ["inbound"],
                "customParameters": {"tenant": "acme", "agent": "booking"},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        }
    )


def media(seq: int, chunk: int, payload: bytes, stream: str = STREAM) -> str:
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": str(seq),
            "streamSid": stream,
            "media": {
                "track": "inbound",
                "chunk": str(chunk),
                "timestamp": str(20 * (chunk - 1)),
                "payload": base64.b64encode(payload).decode(),
            },
        }
    )


def dtmf(seq: int, digit: str = "5") -> str:
    return json.dumps(
        {
            "event": "dtmf",
            "sequenceNumber": str(seq),
            "streamSid": STREAM,
            "dtmf": {"track": "inbound_track", "digit": digit},
        }
    )


def mark(seq: int, name: str) -> str:
    return json.dumps(
        {"event": "mark", "sequenceNumber": str(seq), "streamSid": STREAM, "mark": {"name": name}}
    )


def stop(seq: int) -> str:
    return json.dumps(
        {
            "event": "stop",
            "sequenceNumber": str(seq),
            "streamSid": STREAM,
            "stop": {"accountSid": ACCOUNT, "callSid": CALL},
        }
    )


def caller_ulaw(n: int, seed: int = 1) -> bytes:
    return bytes(np.random.RandomState(seed).randint(0, 256, n, dtype=np.uint8))


def started() -> TwilioStreamState:
    state = TwilioStreamState()
    state.receive(connected())
    state.receive(start())
    return state


@pytest.fixture
def warnings_logged():
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING", format="{message}")
    yield lines
    logger.remove(sink)


def test_full_call_sequence():
    state = TwilioStreamState()
    assert state.receive(connected()) == Connected(protocol="Call", version="1.0.0")

    ev = state.receive(start())
    assert isinstance(ev, Start)
    assert (ev.stream_sid, ev.call_sid, ev.account_sid) == (STREAM, CALL, ACCOUNT)
    assert ev.tracks == ("inbound",)
    assert ev.custom_parameters == {"tenant": "acme", "agent": "booking"}
    assert (ev.media_format.encoding, ev.media_format.sample_rate, ev.media_format.channels) == (
        "audio/x-mulaw",
        8000,
        1,
    )
    assert ev.sequence_number == 1
    assert (state.stream_sid, state.call_sid) == (STREAM, CALL)
    assert state.custom_parameters == {"tenant": "acme", "agent": "booking"}

    for i in range(1, 6):
        payload = caller_ulaw(160, seed=i)
        ev = state.receive(media(i + 1, i, payload))
        assert isinstance(ev, Media)
        assert (ev.track, ev.chunk, ev.timestamp, ev.sequence_number) == ("inbound", i, 20 * (i - 1), i + 1)
        assert ev.payload.dtype == np.int16
        np.testing.assert_array_equal(ev.payload, ulaw_decode(payload))

    ev = state.receive(dtmf(7, "#"))
    assert ev == Dtmf(STREAM, "inbound_track", "#", 7)

    sent_piece(state, 0.1)
    ev = state.receive(mark(8, "a1"))
    assert ev == Mark(STREAM, "a1", 8)
    assert state.playout.heard_seconds == pytest.approx(0.1)

    ev = state.receive(stop(9))
    assert ev == Stop(STREAM, ACCOUNT, CALL, None, 9)
    assert not state.counts


def test_stop_reason_read_when_present():
    msg = json.loads(stop(3))
    msg["stop"]["reason"] = "call ended"
    assert parse_message(json.dumps(msg)).reason == "call ended"


def test_bytes_message_parses():
    assert isinstance(parse_message(start().encode()), Start)


def sent_piece(state: TwilioStreamState, seconds: float) -> str:
    """Agent audio of `seconds` sent and then marked, as the output transport does; the mark's name."""
    state.playout.sending(seconds)
    return json.loads(state.mark())["mark"]["name"]


def test_outbound_media_and_mark_name_the_piece_sent():
    state = started()
    pcm = (np.sin(np.arange(160) / 5) * 8000).astype(np.int16)
    media_msg = json.loads(state.media(ulaw_encode(pcm)))
    assert media_msg["event"] == "media" and media_msg["streamSid"] == STREAM
    assert base64.b64decode(media_msg["media"]["payload"]) == ulaw_encode(pcm)
    assert state.mark() is None  # nothing sent yet: nothing to mark
    state.playout.sending(0.02)
    assert json.loads(state.mark()) == {"event": "mark", "streamSid": STREAM, "mark": {"name": "a1"}}
    assert state.playout.pending_marks == ("a1",)
    assert state.mark() is None


def test_outbound_before_start_is_a_programming_error():
    with pytest.raises(RuntimeError):
        TwilioStreamState().media(b"\xff" * 160)


def test_marks_echoed_in_order_advance_heard():
    state = started()
    names = [sent_piece(state, 0.2) for _ in range(3)]
    assert len(set(names)) == 3
    assert state.playout.heard_seconds == 0.0
    assert state.mark_echo(names[0])
    assert state.playout.heard_seconds == pytest.approx(0.2)
    state.receive(mark(5, names[1]))
    assert state.playout.heard_seconds == pytest.approx(0.4)
    assert state.playout.pending_marks == (names[2],)
    assert not state.counts


def test_out_of_order_echo_counted_and_implies_earlier_heard():
    state = started()
    for _ in range(3):
        sent_piece(state, 0.02)
    assert state.mark_echo("a2")
    assert state.playout.heard_seconds == pytest.approx(0.04)
    assert state.counts == {"mark_out_of_order": 1}
    assert state.playout.pending_marks == ("a3",)
    assert not state.mark_echo("a1")  # already counted as heard
    assert state.playout.heard_seconds == pytest.approx(0.04)
    assert state.counts["unknown_mark"] == 1


def test_clear_drops_unechoed_marks():
    state = started()
    for _ in range(3):
        sent_piece(state, 0.1)
    state.mark_echo("a1")
    assert json.loads(state.clear()) == {"event": "clear", "streamSid": STREAM}
    assert state.playout.pending_marks == ()
    assert state.playout.unplayed_seconds() == pytest.approx(0.2)
    # Twilio echoes the cleared marks right after `clear`: discarded audio, not heard, and not an error.
    assert state.receive(mark(10, "a2")) == Mark(STREAM, "a2", 10)
    state.mark_echo("a3")
    assert state.playout.heard_seconds == pytest.approx(0.1)
    assert not state.counts
    # Marks sent after the clear work as before.
    sent_piece(state, 0.1)
    state.mark_echo("a4")
    assert state.playout.heard_seconds == pytest.approx(0.2)
    assert state.clear() is None  # nothing left at Twilio to clear


def _with(builder, edit) -> str:
    msg = json.loads(builder)
    edit(msg)
    return json.dumps(msg)


BAD_MESSAGES = {
    "bad_json": '{"event": "media", ',
    "not_an_object": '["event", "media"]',
    "unknown_event": json.dumps({"event": "bogus", "streamSid": STREAM}),
    "missing_field": _with(media(2, 1, b"\xff" * 160), lambda m: m["media"].pop("payload")),
    "bad_base64": _with(media(2, 1, b"\xff" * 160), lambda m: m["media"].update(payload="!!not base64!!")),
    "bad_payload_length": media(2, 1, b"\xff" * (MAX_PAYLOAD_BYTES + 1)),
    "wrong_stream": media(2, 1, b"\xff" * 160, stream="MZ" + "9" * 32),
    "duplicate_start": start(),
    "unknown_mark": mark(2, "never-sent"),
}


@pytest.mark.parametrize("kind", sorted(BAD_MESSAGES))
def test_each_error_kind_counted_logged_once_and_dropped(kind, warnings_logged):
    state = started()
    for _ in range(3):
        assert state.receive(BAD_MESSAGES[kind]) is None
    assert state.counts == {kind: 3}
    assert len(warnings_logged) == 1
    assert kind in warnings_logged[0] and STREAM in warnings_logged[0]
    # The call goes on.
    assert isinstance(state.receive(media(9, 8, b"\x7f" * 160)), Media)


def test_media_before_start(warnings_logged):
    state = TwilioStreamState()
    state.receive(connected())
    assert state.receive(media(2, 1, b"\xff" * 160)) is None
    assert state.receive(mark(3, "a1")) is None
    assert state.receive(dtmf(4)) is None
    assert state.counts == {"media_before_start": 3}
    assert len(warnings_logged) == 1
    assert isinstance(state.receive(start()), Start)
    assert isinstance(state.receive(media(5, 2, b"\xff" * 160)), Media)


def test_mark_out_of_order_logged_once_per_call(warnings_logged):
    for _ in range(2):  # a new call logs again
        state = started()
        for _ in range(4):
            sent_piece(state, 0.02)
        state.mark_echo("a2")
        state.mark_echo("a4")
        assert state.counts == {"mark_out_of_order": 2}
    assert len(warnings_logged) == 2


def test_every_documented_kind_is_tested():
    assert set(ERROR_KINDS) == set(BAD_MESSAGES) | {"media_before_start", "mark_out_of_order"}


@pytest.mark.parametrize(
    "payload,kind",
    [
        ("", "bad_payload_length"),
        ("AAA", "bad_base64"),
        ("A" * 20000, "bad_payload_length"),
        (5, "missing_field"),
    ],
)
def test_payload_edge_cases(payload, kind):
    text = _with(media(2, 1, b"\0"), lambda m: m["media"].update(payload=payload))
    with pytest.raises(TwilioWireError) as e:
        parse_message(text)
    assert e.value.kind == kind


def test_bad_utf8_and_deep_nesting_are_bad_json():
    for text in (b"\xff\xfe\xfa", "[" * 100_000):
        with pytest.raises(TwilioWireError) as e:
            parse_message(text)
        assert e.value.kind == "bad_json"


def _mutations(rng: random.Random, text: str) -> str:
    op = rng.randrange(6)
    if op == 0:  # truncate
        return text[: rng.randrange(len(text))]
    if op == 1:  # flip characters
        chars = list(text)
        for _ in range(rng.randint(1, 5)):
            chars[rng.randrange(len(chars))] = chr(rng.randrange(0x20, 0x250))
        return "".join(chars)
    msg = json.loads(text)
    target = msg
    for _ in range(rng.randint(0, 2)):  # descend into a nested object sometimes
        nested = [v for v in target.values() if isinstance(v, dict)]
        if not nested:
            break
        target = rng.choice(nested)
    key = rng.choice(list(target))
    if op == 2:
        del target[key]
    elif op == 3:
        target[key] = rng.choice(
            [None, 0, -1, 1.5, True, "", "x" * 50, [], {}, [1, 2], {"a": None}, "9" * 30]
        )
    elif op == 4:
        target[key + "x"] = target.pop(key)
    else:
        return json.dumps(target if rng.random() < 0.5 else [msg])
    return json.dumps(msg)


def test_fuzzed_messages_never_raise():
    rng = random.Random(20261122)
    valid = [connected(), start(), media(2, 1, caller_ulaw(160)), dtmf(3), mark(4, "a1"), stop(5)]
    state = started()
    sent_piece(state, 0.02)
    dropped = 0
    for _ in range(300):
        text = _mutations(rng, rng.choice(valid))
        if rng.random() < 0.1:
            text = text.encode("utf-8", "surrogatepass")
        try:
            parse_message(text)
        except TwilioWireError:
            pass
        if state.receive(text) is None:
            dropped += 1
        TwilioStreamState().receive(text)  # before `start`: the order checks
    # Out-of-order mark echoes are counted but still applied; every other count is one dropped message.
    assert sum(state.counts.values()) - state.counts["mark_out_of_order"] == dropped
    assert set(state.counts) <= set(ERROR_KINDS)
    assert isinstance(state.receive(media(99, 50, caller_ulaw(160))), Media)
