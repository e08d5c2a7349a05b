"""The engine service's wire format: what goes over one gRPC message, both ways.

A message is a small JSON header and the raw bytes of its arrays (caller audio, reply audio, codes,
a voice's reference), so no codegen and no per-sample encoding:

    [4 bytes: header length, big-endian][header: UTF-8 JSON][array bytes, in the order the header lists]

The header is {"type": ..., "arrays": [[name, dtype, shape], ...], ...fields}. Arrays are little-endian
float32, int32 or int64. The service's methods take and give these bytes as they are (gRPC's generic
handlers with no serializer), so this module is the whole protocol; `WIRE_VERSION` changes with it.

Into the engine, on a session's stream (`SESSION_METHOD`): open (first, once), respond, cancel, heard,
instruct, set_tools, tool_result, set_voice, prepare_voice. Out of it: opened, chunk, end, tool_call,
voice_ready, error. `STATUS_METHOD` takes an empty message and answers a `status` one.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

WIRE_VERSION = 1
SERVICE = "chroma.engine.Engine"
SESSION_METHOD = f"/{SERVICE}/Session"
STATUS_METHOD = f"/{SERVICE}/Status"
# A voice's reference (up to a minute of 24 kHz float32) must fit in one message.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
DTYPES = {"float32": np.dtype("<f4"), "int32": np.dtype("<i4"), "int64": np.dtype("<i8")}
_LENGTH = struct.Struct(">I")


class WireError(ValueError):
    """A message that is not in this format (or not in this version of it)."""


@dataclass
class Message:
    type: str
    fields: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)


def encode(type_: str, arrays: dict[str, np.ndarray] | None = None, **fields: Any) -> bytes:
    """One message: `fields` must be JSON-able (values that are not are sent as their str())."""
    specs, blobs = [], []
    for name, array in (arrays or {}).items():
        array = np.asarray(array)
        dtype = next(
            (n for n, d in DTYPES.items() if array.dtype == d or array.dtype == d.newbyteorder("=")), None
        )
        if dtype is None:
            raise WireError(f"array {name!r} is {array.dtype}; expected one of {', '.join(DTYPES)}")
        specs.append([name, dtype, list(array.shape)])
        blobs.append(np.ascontiguousarray(array, dtype=DTYPES[dtype]).tobytes())
    header = json.dumps({"type": type_, "arrays": specs, **fields}, ensure_ascii=False, default=str).encode()
    return b"".join([_LENGTH.pack(len(header)), header, *blobs])


def decode(data: bytes) -> Message:
    """The message in `data`; WireError says what is wrong with it."""
    if len(data) < _LENGTH.size:
        raise WireError(
            f"message of {len(data)} bytes; expected at least a {_LENGTH.size}-byte header length"
        )
    (length,) = _LENGTH.unpack_from(data)
    end = _LENGTH.size + length
    if end > len(data):
        raise WireError(f"header length {length} runs past the message's {len(data)} bytes")
    try:
        header = json.loads(data[_LENGTH.size : end])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise WireError("header is not an object with a string 'type'")
    arrays: dict[str, np.ndarray] = {}
    offset = end
    specs = header.pop("arrays", [])
    if not isinstance(specs, list):
        raise WireError(f"'arrays' is {type(specs).__name__}; expected a list of [name, dtype, shape]")
    for spec in specs:
        try:
            name, dtype, shape = spec
            dtype, shape = DTYPES[dtype], tuple(int(n) for n in shape)
        except (TypeError, ValueError, KeyError):
            raise WireError(
                f"array spec {spec!r}; expected [name, one of {', '.join(DTYPES)}, shape]"
            ) from None
        if any(n < 0 for n in shape):
            raise WireError(f"array {name!r} has a negative dimension {list(shape)}")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset + size > len(data):
            raise WireError(f"array {name!r} ({size} bytes) runs past the message's {len(data)} bytes")
        arrays[name] = np.frombuffer(data, dtype, count=size // dtype.itemsize, offset=offset).reshape(shape)
        offset += size
    if offset != len(data):
        raise WireError(f"{len(data) - offset} bytes after the last array")
    type_ = header.pop("type")
    return Message(type_, header, arrays)
