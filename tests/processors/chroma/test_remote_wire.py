"""The engine service's wire format, and what the engine does with messages that are not in it."""

import asyncio
import struct

import numpy as np
import pytest

from processors.chroma.engine_server import EngineThread
from processors.chroma.engine_wire import SESSION_METHOD, WIRE_VERSION, WireError, decode, encode
from processors.chroma.remote import RemoteEngine
from tests.conftest import user_audio


def framed(header: bytes) -> bytes:
    return struct.pack(">I", len(header)) + header


def test_a_message_round_trips_with_its_fields_and_arrays():
    audio = np.linspace(-1, 1, 3841, dtype=np.float32)
    codes = np.arange(16, dtype=np.int32).reshape(2, 8)
    message = decode(encode("chunk", {"audio": audio, "codes": codes}, reply=3, frames=[4, 6], text="héllo"))
    assert message.type == "chunk" and message.fields == {"reply": 3, "frames": [4, 6], "text": "héllo"}
    assert np.array_equal(message.arrays["audio"], audio) and message.arrays["audio"].dtype == np.float32
    assert np.array_equal(message.arrays["codes"], codes) and message.arrays["codes"].shape == (2, 8)
    assert decode(encode("cancel", reply=1)).arrays == {}


def test_an_array_of_a_type_the_format_does_not_carry_is_refused_by_name():
    with pytest.raises(WireError, match="array 'audio' is float64; expected one of float32, int32, int64"):
        encode("respond", {"audio": np.zeros(4)})


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"\x00\x00", "expected at least a 4-byte header length"),
        (b"\x00\x00\x00\x09{}", "runs past the message"),
        (b"\x00\x00\x00\x02[]", "not an object with a string 'type'"),
        (b"\x00\x00\x00\x03{x}", "not JSON"),
        (encode("chunk", {"audio": np.zeros(4, np.float32)})[:-4], "runs past the message"),
        (encode("cancel") + b"extra", "5 bytes after the last array"),
        (framed(b'{"type": "x", "arrays": [["a", "float16", [1]]]}'), "expected [name, one of float32"),
    ],
)
def test_a_malformed_message_says_what_is_wrong(data, problem):
    with pytest.raises(WireError) as err:
        decode(data)
    assert problem in str(err.value)


async def test_the_engine_answers_a_bad_message_with_an_error_and_the_session_goes_on(tiny, voice):
    """A stream written by hand: a malformed message and an unknown one are refused; the reply after works."""
    with EngineThread(tiny) as url:
        engine = RemoteEngine(url)
        voice_spec = {"key": "k" * 64, "name": "", "transcript": voice[1]}
        opening = encode(
            "open", {"voice_audio": voice[0]}, wire_version=WIRE_VERSION, voice=voice_spec, max_frames=4
        )

        async def requests():
            yield opening
            yield b"\x00\x00\x00\x01garbage"
            yield encode("dance")
            yield encode("respond", {"audio": user_audio(0.3, 5)}, reply=1)
            await asyncio.sleep(30)  # the end of the requests is the end of the session

        got = []
        call = engine.channel().stream_stream(SESSION_METHOD)(requests())
        async for data in call:
            got.append(decode(data))
            if got[-1].type == "end":
                call.cancel()
                break
        kinds = [m.type for m in got]
        assert kinds[0] == "opened" and kinds[-1] == "end" and "chunk" in kinds
        errors = [m["message"] for m in got if m.type == "error"]
        assert any("header" in e for e in errors) and any("'dance'" in e for e in errors)
        engine.close()


async def test_a_session_opened_with_another_wire_version_is_refused_with_both_versions(tiny, voice):
    with EngineThread(tiny) as url:
        engine = RemoteEngine(url)

        async def requests():
            yield encode("open", wire_version=WIRE_VERSION + 1)
            await asyncio.sleep(5)

        answers = [decode(data) async for data in engine.channel().stream_stream(SESSION_METHOD)(requests())]
        assert [m.type for m in answers] == ["error"] and answers[0]["fatal"]
        assert f"wire version {WIRE_VERSION + 1}" in answers[0]["message"]
        assert f"speaks version {WIRE_VERSION}" in answers[0]["message"]
        engine.close()
