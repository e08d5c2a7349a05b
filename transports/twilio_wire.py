"""Twilio Media Streams on the wire: parse what Twilio sends, build what we send, and keep one call's
stream state (order, stream identity, bad-input counts) and its account of the agent audio sent and
played (`TwilioPlayout`, fed by mark echoes).

No frames and no sockets here: the transport feeds text messages in and sends the strings it gets back.
Message shapes follow Twilio's Media Streams reference (see shared docs, telephony facts section 2).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from loguru import logger

from processors.audio import ulaw_decode

TWILIO_RATE = 8000  # Media Streams audio is always mu-law, 8 kHz, mono
ENCODING = "audio/x-mulaw"
# Largest inbound media payload accepted: 1 s of audio. Twilio sends 160 bytes; anything far larger is a
# broken or hostile peer, and decoding it would only waste memory.
MAX_PAYLOAD_BYTES = TWILIO_RATE
_MAX_PAYLOAD_B64 = 4 * ((MAX_PAYLOAD_BYTES + 2) // 3)

# Kinds of bad input counted by TwilioStreamState; each is logged once per call.
ERROR_KINDS = (
    "bad_json",  # not JSON text (or not UTF-8, or nested too deep to parse)
    "not_an_object",  # JSON, but not an object
    "unknown_event",  # `event` is not one Twilio sends to us
    "missing_field",  # a field we need is absent or of the wrong type
    "bad_base64",  # media payload is not strict base64
    "bad_payload_length",  # media payload empty or over MAX_PAYLOAD_BYTES
    "media_before_start",  # media, mark or dtmf before `start`
    "wrong_stream",  # streamSid is not this call's
    "duplicate_start",  # a second `start` on the same WebSocket
    "unknown_mark",  # a mark echo for a name never sent, or already echoed
    "mark_out_of_order",  # a mark echoed before an earlier one still waiting
)


class TwilioWireError(ValueError):
    """A message that cannot be used; ``kind`` is a short label from ERROR_KINDS for counting."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


# --- events Twilio sends (attribute names are Twilio's JSON keys in snake_case) ---


@dataclass(frozen=True)
class Connected:
    """First message after the WebSocket upgrade; carries no streamSid."""

    protocol: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class MediaFormat:
    """`start.mediaFormat`: always mu-law/8000/1 on Twilio today."""

    encoding: str = ENCODING
    sample_rate: int = TWILIO_RATE
    channels: int = 1


@dataclass(frozen=True)
class Start:
    """`start`: the stream's and call's identity and the `<Parameter>` values from TwiML."""

    stream_sid: str
    call_sid: str
    account_sid: str | None
    tracks: tuple[str, ...]
    media_format: MediaFormat
    custom_parameters: dict[str, str] = field(default_factory=dict)
    sequence_number: int | None = None


@dataclass(frozen=True, eq=False)  # eq over a numpy array is ambiguous
class Media:
    """`media`: one chunk of caller audio (normally 20 ms), decoded to int16 PCM at 8 kHz."""

    stream_sid: str
    track: str
    chunk: int
    timestamp: int  # ms since the stream began
    payload: np.ndarray = field(repr=False)
    sequence_number: int | None = None


@dataclass(frozen=True)
class Mark:
    """`mark`: Twilio's echo of a mark we sent (played, or discarded by `clear`)."""

    stream_sid: str
    name: str
    sequence_number: int | None = None


@dataclass(frozen=True)
class Dtmf:
    """`dtmf`: the caller pressed a key."""

    stream_sid: str
    track: str
    digit: str
    sequence_number: int | None = None


@dataclass(frozen=True)
class Stop:
    """`stop`: the stream stopped or the call ended."""

    stream_sid: str
    account_sid: str | None = None
    call_sid: str | None = None
    reason: str | None = None
    sequence_number: int | None = None


TwilioEvent = Connected | Start | Media | Mark | Dtmf | Stop


# --- parsing ---


def _obj(msg: dict[str, Any], key: str) -> dict[str, Any]:
    value = msg.get(key)
    if not isinstance(value, dict):
        raise TwilioWireError("missing_field", f"{key!r} must be an object")
    return value


def _str(msg: dict[str, Any], key: str, where: str = "") -> str:
    value = msg.get(key)
    if not isinstance(value, str):
        raise TwilioWireError("missing_field", f"{where}{key!r} must be a string")
    return value


def _opt_str(msg: dict[str, Any], key: str) -> str | None:
    value = msg.get(key)
    return value if isinstance(value, str) else None


def _int(value: Any, name: str) -> int:
    # Twilio sends every counter as a JSON string ("7"); a plain number is accepted too.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and len(value) <= 20:
        try:
            return int(value)
        except ValueError:
            pass
    raise TwilioWireError("missing_field", f"{name!r} must be an integer string")


def _int_or(value: Any, default: int) -> int:
    try:
        return _int(value, "")
    except TwilioWireError:
        return default


def _seq(msg: dict[str, Any]) -> int | None:
    # Informational only (we do not reorder), so a bad one never costs the message.
    try:
        return _int(msg.get("sequenceNumber"), "sequenceNumber")
    except TwilioWireError:
        return None


def _payload(text: Any) -> np.ndarray:
    if not isinstance(text, str):
        raise TwilioWireError("missing_field", "'media.payload' must be a string")
    # Checked before decoding so an absurd payload costs nothing. With mu-law every byte is one sample,
    # so any non-empty length is a whole number of samples.
    if not text or len(text) > _MAX_PAYLOAD_B64:
        raise TwilioWireError("bad_payload_length", f"payload of {len(text)} base64 characters")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise TwilioWireError("bad_base64", str(e)) from None
    if not raw or len(raw) > MAX_PAYLOAD_BYTES:
        raise TwilioWireError("bad_payload_length", f"payload of {len(raw)} bytes")
    return ulaw_decode(raw)


def parse_message(text: str | bytes) -> TwilioEvent:
    """One WebSocket text message from Twilio as an event; raises TwilioWireError if it is unusable."""
    try:
        msg = json.loads(text)
    except (ValueError, RecursionError, TypeError) as e:  # UnicodeDecodeError is a ValueError
        raise TwilioWireError("bad_json", type(e).__name__) from None
    if not isinstance(msg, dict):
        raise TwilioWireError("not_an_object", type(msg).__name__)
    event = _str(msg, "event")
    if event == "connected":
        return Connected(protocol=_opt_str(msg, "protocol"), version=_opt_str(msg, "version"))
    if event not in ("start", "media", "mark", "dtmf", "stop"):
        raise TwilioWireError("unknown_event", repr(event[:40]))

    if event == "start":
        start = _obj(msg, "start")
        # streamSid is both at the top level and inside `start`; either will do.
        stream_sid = _opt_str(start, "streamSid") or _str(msg, "streamSid")
        # Lenient on what we do not need: a dropped `start` would lose the whole call.
        fmt = start.get("mediaFormat") if isinstance(start.get("mediaFormat"), dict) else {}
        params = start.get("customParameters") if isinstance(start.get("customParameters"), dict) else {}
        tracks = start.get("tracks") if isinstance(start.get("tracks"), list) else []
        return Start(
            stream_sid=stream_sid,
            call_sid=_str(start, "callSid", "start."),
            account_sid=_opt_str(start, "accountSid"),
            tracks=tuple(t for t in tracks if isinstance(t, str)),
            media_format=MediaFormat(
                encoding=_opt_str(fmt, "encoding") or ENCODING,
                sample_rate=_int_or(fmt.get("sampleRate"), TWILIO_RATE),
                channels=_int_or(fmt.get("channels"), 1),
            ),
            custom_parameters={k: v for k, v in params.items() if isinstance(v, str)},
            sequence_number=_seq(msg),
        )

    stream_sid = _str(msg, "streamSid")
    if event == "media":
        media = _obj(msg, "media")
        return Media(
            stream_sid=stream_sid,
            track=_opt_str(media, "track") or "inbound",
            chunk=_int(media.get("chunk"), "media.chunk"),
            timestamp=_int(media.get("timestamp"), "media.timestamp"),
            payload=_payload(media.get("payload")),
            sequence_number=_seq(msg),
        )
    if event == "mark":
        return Mark(stream_sid, _str(_obj(msg, "mark"), "name", "mark."), _seq(msg))
    if event == "dtmf":
        dtmf = _obj(msg, "dtmf")
        track = _opt_str(dtmf, "track") or "inbound_track"
        return Dtmf(stream_sid, track, _str(dtmf, "digit", "dtmf."), _seq(msg))
    # stop: the `stop` object is informational; a stop without it still ends the stream.
    stop = msg.get("stop") if isinstance(msg.get("stop"), dict) else {}
    return Stop(
        stream_sid=stream_sid,
        account_sid=_opt_str(stop, "accountSid"),
        call_sid=_opt_str(stop, "callSid"),
        reason=_opt_str(stop, "reason"),
        sequence_number=_seq(msg),
    )


# --- building what we send (bidirectional streams only; no sequenceNumber needed) ---


def _dumps(msg: dict[str, Any]) -> str:
    return json.dumps(msg, separators=(",", ":"))


def media_message(stream_sid: str, ulaw: bytes) -> str:
    """`media` carrying raw mu-law/8000 bytes (no file header: Twilio would play it as noise)."""
    return _dumps(
        {"event": "media", "streamSid": stream_sid, "media": {"payload": base64.b64encode(ulaw).decode()}}
    )


def mark_message(stream_sid: str, name: str) -> str:
    """`mark`: Twilio echoes ``name`` once all audio queued before it has played (or been cleared)."""
    return _dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}})


def clear_message(stream_sid: str) -> str:
    """`clear`: Twilio drops its queued audio and echoes every mark still waiting."""
    return _dumps({"event": "clear", "streamSid": stream_sid})


# --- what the caller heard of the agent's audio ---

# After the agent's last audio, how long past the estimated end of Twilio's playback to wait for the last
# mark echo (a lost echo must not hold the call).
DRAIN_GRACE_SECS = 1.0


class TwilioPlayout:
    """One call's account of the agent audio sent to Twilio and played there: the `Playout` of a Twilio
    line (transports/line.py).

    Twilio plays its queue in order and echoes a mark once the audio sent before it has played, so
    echoes come back in send order and only they tell what the caller heard. The output transport
    reports each chunk as it sends it (`sending`), asks for a mark naming the audio sent since the last
    one (`mark`), and `clear`s on barge-in; the stream state applies echoes (`echoed`)."""

    def __init__(self) -> None:
        self._next_mark = 0
        self._pending: OrderedDict[str, float] = OrderedDict()  # mark name -> seconds it closes, oldest first
        # Marks dropped by clear(): Twilio still echoes them, and those echoes mean "discarded".
        self._cleared: set[str] = set()
        self._unmarked = 0.0  # seconds sent since the last mark
        self._sent = 0.0  # seconds sent since the stream began, cleared audio taken back out
        self._heard = 0.0
        self._play_end = 0.0  # monotonic time Twilio's queue is estimated to run dry
        self._unplayed_at_clear = 0.0
        self._echoed = asyncio.Event()
        self._far_end_gone = False

    # -- fed by the output transport --

    def sending(self, seconds: float) -> None:
        """A chunk of `seconds` is going out now (counted before the send, so that a barge-in landing
        during it sees the chunk as sent)."""
        self._sent += seconds
        self._unmarked += seconds
        self._play_end = max(self._play_end, time.monotonic()) + seconds

    def mark(self) -> str | None:
        """The name of a new mark closing the audio sent since the last one; None when there is none."""
        if self._unmarked <= 0:
            return None
        self._next_mark += 1
        name = f"a{self._next_mark}"
        self._pending[name] = self._unmarked
        self._unmarked = 0.0
        return name

    def clear(self) -> bool:
        """Barge-in: what was sent and not echoed is dropped unheard (its seconds kept for
        `unplayed_seconds`); pending marks are forgotten. Returns whether Twilio has anything to clear."""
        self._unplayed_at_clear = max(0.0, self._sent - self._heard)
        anything = bool(self._pending) or self._unmarked > 0
        self._cleared.update(self._pending)
        self._pending.clear()
        self._unmarked = 0.0
        self._sent = self._heard
        self._play_end = time.monotonic()
        return anything

    def far_end_gone(self) -> None:
        """Twilio stopped the stream: no more echoes will come."""
        self._far_end_gone = True
        self._echoed.set()

    # -- fed by Twilio --

    def echoed(self, name: str) -> str | None:
        """Twilio echoed mark `name`: its audio and all before it were played. Returns the kind of bad
        input it was (an ERROR_KINDS label: an unknown mark is ignored, one out of order still counts)."""
        if name in self._cleared:
            self._cleared.discard(name)  # expected after clear(): discarded audio, not heard
            return None
        if name not in self._pending:
            return "unknown_mark"
        # Everything queued before this mark has played, so earlier pieces were heard too.
        problem = None if next(iter(self._pending)) == name else "mark_out_of_order"
        while self._pending:
            done, seconds = self._pending.popitem(last=False)
            self._heard += seconds
            if done == name:
                break
        self._echoed.set()
        return problem

    # -- read --

    def queued_seconds(self) -> float:
        """Audio estimated still queued at Twilio: what was sent, less what its real-time playback used."""
        return max(0.0, self._play_end - time.monotonic())

    @property
    def heard_seconds(self) -> float:
        """Seconds of agent audio the caller has heard: up to the last echoed mark."""
        return self._heard

    @property
    def pending_marks(self) -> tuple[str, ...]:
        """Marks sent and not yet echoed, oldest first."""
        return tuple(self._pending)

    def unplayed_seconds(self) -> float:
        """Seconds sent whose marks had not come back when the last barge-in's `clear` went out."""
        return self._unplayed_at_clear

    async def wait_played(self) -> None:
        """Until Twilio has echoed every mark (all sent audio played), bounded by the estimated playback."""
        deadline = time.monotonic() + self.queued_seconds() + DRAIN_GRACE_SECS
        while True:
            self._echoed.clear()  # before the check, so an echo landing in between still wakes us
            remaining = deadline - time.monotonic()
            if not self._pending or self._far_end_gone or remaining <= 0:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._echoed.wait(), timeout=remaining)


# --- one call's stream state ---


class TwilioStreamState:
    """One call's side of the stream: validates incoming messages in context and applies mark echoes
    to the call's `playout`.

    Bad input is counted in ``counts`` (by kind), logged once per kind per call, and dropped: a malformed
    message never ends the call.
    """

    def __init__(self) -> None:
        self.stream_sid: str | None = None
        self.call_sid: str | None = None
        self.account_sid: str | None = None
        self.custom_parameters: dict[str, str] = {}
        self.counts: Counter[str] = Counter()
        self.playout = TwilioPlayout()

    # -- incoming --

    def receive(self, text: str | bytes) -> TwilioEvent | None:
        """Parse and check one message from Twilio; None when it was dropped as bad input.

        A `mark` echo is applied here (see mark_echo) before the Mark event is returned; an echo of an
        unknown mark is dropped. An out-of-order echo is counted but still applied and returned.
        """
        try:
            event = parse_message(text)
            self._check(event)
        except TwilioWireError as e:
            self._reject(e)
            return None
        if isinstance(event, Start):
            self.stream_sid, self.call_sid = event.stream_sid, event.call_sid
            self.account_sid = event.account_sid
            self.custom_parameters = dict(event.custom_parameters)
        elif isinstance(event, Mark) and not self.mark_echo(event.name):
            return None  # unknown mark: counted, and not worth passing on
        return event

    def mark_echo(self, name: str) -> bool:
        """Apply Twilio's echo of mark `name`; False when no such mark is waiting (counted as bad input).

        Only for callers not feeding Twilio's messages through receive(), which applies echoes itself.
        """
        problem = self.playout.echoed(name)
        if problem is not None:
            self._reject(TwilioWireError(problem, name[:40]))
        return problem != "unknown_mark"

    def _check(self, event: TwilioEvent) -> None:
        if isinstance(event, Connected):
            return
        if isinstance(event, Start):
            if self.stream_sid is not None:
                raise TwilioWireError("duplicate_start", event.stream_sid)
            return
        if self.stream_sid is None:
            if isinstance(event, Stop):
                return  # a stop still ends the call, even one that never started
            raise TwilioWireError("media_before_start", type(event).__name__.lower())
        if event.stream_sid != self.stream_sid:
            raise TwilioWireError("wrong_stream", event.stream_sid[:40])

    def _reject(self, error: TwilioWireError) -> None:
        self.counts[error.kind] += 1
        if self.counts[error.kind] == 1:  # once per kind per call: a broken peer must not flood the log
            logger.warning(
                f"Twilio stream {self.stream_sid} (call {self.call_sid}): dropped bad input {error}; "
                f"further '{error.kind}' errors on this call are only counted"
            )

    # -- outgoing --

    def _sid(self, what: str) -> str:
        if self.stream_sid is None:
            raise RuntimeError(f"no Twilio stream yet: {what} needs the streamSid from `start`")
        return self.stream_sid

    def media(self, ulaw: bytes) -> str:
        """`media` for one chunk of agent audio, already mu-law (see `media_message`)."""
        return media_message(self._sid("outbound media"), ulaw)

    def mark(self) -> str | None:
        """A `mark` naming the agent audio sent since the last one (None when there is none); once Twilio
        echoes it, that audio counts as heard."""
        sid = self._sid("a mark")
        name = self.playout.mark()
        return None if name is None else mark_message(sid, name)

    def clear(self) -> str | None:
        """The `clear` message for a barge-in, or None when Twilio has nothing queued to clear; either
        way, audio sent and not yet echoed is forgotten (never heard)."""
        sid = self._sid("clear")
        return clear_message(sid) if self.playout.clear() else None
