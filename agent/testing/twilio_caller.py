"""A stand-in for Twilio's side of `<Connect><Stream>`, for conversation tests, tests and benchmarks.

    caller = TwilioCaller("ws://127.0.0.1:8080/twilio/media", auth_token, sign_url="wss://agent.example.com/twilio/media",
                          parameters={"agent": ..., "token": ...})
    timeline = await caller.run(audio=speech_8k, seconds=8.0, dtmf=[(1.0, "5")])

Or live, deciding as the call goes: start `run(seconds=...)` as a task, then `say(pcm)`, `press(digit)`
and `hang_up()` while it runs; `timeline.playing` grows by one entry per 20 ms tick.

Like Twilio (shared docs, telephony facts 2.2-2.5 and 2.9): the upgrade is signed over the stream URL as
written in the TwiML; `connected` and `start` come first; caller audio goes out as real-time 20 ms mu-law
`media` frames, then mu-law silence; the server's media is played on a 20 ms clock; a mark is echoed once
the audio queued before it has played (at once with nothing queued); `clear` drops the queue and echoes
its marks at once; `stop` ends the stream.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlencode

import httpx
import numpy as np
import websockets
from twilio.request_validator import RequestValidator

from processors.audio import ulaw_decode, ulaw_encode
from transports.twilio_wire import TWILIO_RATE as RATE

TICK = 0.02
FRAME = round(RATE * TICK)  # samples (and mu-law bytes) per 20 ms
ULAW_SILENCE = b"\xff" * FRAME
# An empty stretch at least this long ends a reply: replies are separated by the caller's own turn.
REPLY_BREAK_SECS = 0.5


def sid(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


@dataclass
class Timeline:
    """What happened on the call, in seconds since the stream began (the call clock)."""

    heard: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))  # int16 at 8 kHz, one per tick
    playing: list[bool] = field(default_factory=list)  # per tick: agent audio was played
    media_times: list[float] = field(default_factory=list)  # each received media message
    marks_received: list[tuple[float, str]] = field(default_factory=list)
    marks_echoed: list[tuple[float, str]] = field(default_factory=list)
    clear_times: list[float] = field(default_factory=list)
    other_messages: list[dict] = field(default_factory=list)
    barge_in_at: float | None = None  # when the caller started talking over the reply
    close_code: int | None = None
    closed_by_server_at: float | None = None

    def replies(self, break_secs: float = REPLY_BREAK_SECS) -> list[tuple[float, float]]:
        """(first, last) tick time of each reply: runs of played ticks split by breaks of break_secs."""
        runs: list[list[float]] = []
        min_gap = round(break_secs / TICK)
        last = None
        for i, on in enumerate(self.playing):
            if not on:
                continue
            if last is None or i - last > min_gap:
                runs.append([i * TICK, i * TICK])
            runs[-1][1] = i * TICK
            last = i
        return [(a, b) for a, b in runs]

    @property
    def reply_starts(self) -> list[float]:
        """When the first audio of each reply was heard."""
        return [a for a, _ in self.replies()]

    def gaps(self, break_secs: float = REPLY_BREAK_SECS) -> list[float]:
        """Times of ticks with an empty queue between a reply's first and last audio."""
        out = []
        for a, b in self.replies(break_secs):
            for i in range(round(a / TICK), round(b / TICK) + 1):
                if not self.playing[i]:
                    out.append(i * TICK)
        return out

    def played_seconds_between(self, start: float, end: float) -> float:
        """Seconds of agent audio played in [start, end)."""
        return sum(TICK for i, on in enumerate(self.playing) if on and start <= i * TICK < end)


class TwilioCaller:
    """One call from Twilio's side. ``sign_url`` is the stream URL Twilio signs (from the TwiML);
    ``url`` is where this process actually connects (e.g. ws://127.0.0.1:port/twilio/media)."""

    def __init__(
        self,
        url: str,
        auth_token: str | None,
        *,
        sign_url: str | None = None,
        parameters: dict[str, str] | None = None,
        call_sid: str | None = None,
        signature: str | None = None,
    ):
        self.url = url
        self.stream_sid, self.call_sid, self.account_sid = sid("MZ"), call_sid or sid("CA"), sid("AC")
        self.parameters = dict(parameters or {})
        if signature is None and auth_token:
            signature = RequestValidator(auth_token).compute_signature(sign_url or url, {})
        self.headers = {"X-Twilio-Signature": signature} if signature else {}
        self.timeline = Timeline()
        self._seq = 0
        self.t0: float | None = None  # time.monotonic() when the stream began: the call clock's zero
        self._live = bytearray()  # mu-law caller audio said live, not yet sent
        self._live_dtmf: list[str] = []
        self._hang_up = False

    def now(self) -> float:
        return time.monotonic() - self.t0 if self.t0 is not None else 0.0

    def say(self, pcm8k: np.ndarray) -> float:
        """Caller audio (int16, 8 kHz), sent after what is already waiting; returns when (call seconds) it starts."""
        start = self.now() + len(self._live) / RATE
        self._live += ulaw_encode(np.asarray(pcm8k, np.int16))
        return start

    def press(self, digit: str) -> None:
        self._live_dtmf.append(digit)

    def hang_up(self) -> None:
        """The caller hangs up: `stop` goes out on the next tick and the stream closes."""
        self._hang_up = True

    @property
    def saying(self) -> bool:
        return bool(self._live)

    def _message(self, event: str, **fields) -> str:
        self._seq += 1
        return json.dumps(
            {"event": event, "sequenceNumber": str(self._seq), "streamSid": self.stream_sid, **fields}
        )

    def start_message(self) -> str:
        self._seq = 0
        return self._message(
            "start",
            start={
                "streamSid": self.stream_sid,
                "accountSid": self.account_sid,
                "callSid": self.call_sid,
                "tracks": ["inbound"],
                "customParameters": self.parameters,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE, "channels": 1},
            },
        )

    async def run(
        self,
        audio: np.ndarray | None = None,
        *,
        seconds: float,
        audio_at: float = 0.0,
        barge_in: tuple[np.ndarray, float] | None = None,
        dtmf: list[tuple[float, str]] = (),
        raw: list[tuple[float, str]] = (),
        before_start: list[str] = (),
        vanish_at: float | None = None,
        send_stop: bool = True,
    ) -> Timeline:
        """Run the call for ``seconds`` (or until the server closes it) and return its timeline.

        ``audio`` (int16, 8 kHz) starts at ``audio_at``; silence fills the rest. ``barge_in``: (audio, delay)
        is said ``delay`` seconds after the first reply's audio is first heard (talking over it). ``raw`` messages are sent
        as given at their times (bad input); ``before_start`` ones right after `connected`.
        ``vanish_at``: drop the TCP connection then, with no `stop` and no close frame.
        """
        caller_ulaw = ulaw_encode(np.asarray(audio, np.int16)) if audio is not None else b""
        barge_ulaw = ulaw_encode(np.asarray(barge_in[0], np.int16)) if barge_in is not None else b""
        barge_at: float | None = None
        pending = sorted([(t, "dtmf", d) for t, d in dtmf] + [(t, "raw", m) for t, m in raw])
        queue: deque = deque()  # ("audio", bytearray) | ("mark", name)
        tl = self.timeline
        heard = []
        async with websockets.connect(self.url, additional_headers=self.headers, max_size=None) as ws:
            t0 = self.t0 = time.monotonic()

            def now() -> float:
                return time.monotonic() - t0

            async def echo(name: str) -> None:
                tl.marks_echoed.append((now(), name))
                await ws.send(self._message("mark", mark={"name": name}))

            async def receive() -> None:
                try:
                    async for text in ws:
                        msg = json.loads(text)
                        event = msg.get("event")
                        if event == "media":
                            tl.media_times.append(now())
                            queue.append(("audio", bytearray(base64.b64decode(msg["media"]["payload"]))))
                        elif event == "mark":
                            name = msg["mark"]["name"]
                            tl.marks_received.append((now(), name))
                            if any(kind == "audio" for kind, _ in queue):
                                queue.append(("mark", name))
                            else:  # nothing queued before it: echoed at once
                                await echo(name)
                        elif event == "clear":
                            tl.clear_times.append(now())
                            names = [item for kind, item in queue if kind == "mark"]
                            queue.clear()
                            for name in names:  # discarded, echoed at once
                                await echo(name)
                        else:
                            tl.other_messages.append(msg)
                except websockets.ConnectionClosed:
                    pass
                tl.closed_by_server_at = now()
                tl.close_code = ws.close_code

            await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            for text in before_start:
                await ws.send(text)
            await ws.send(self.start_message())
            receiver = asyncio.create_task(receive())
            chunk = 0
            try:
                for tick in range(round(seconds / TICK)):
                    await asyncio.sleep(max(0.0, t0 + tick * TICK - time.monotonic()))
                    if receiver.done() or self._hang_up:
                        break
                    if vanish_at is not None and now() >= vanish_at:
                        ws.transport.abort()
                        break
                    while pending and pending[0][0] <= now():
                        _t, kind, value = pending.pop(0)
                        if kind == "dtmf":
                            await ws.send(
                                self._message("dtmf", dtmf={"track": "inbound_track", "digit": value})
                            )
                        else:
                            await ws.send(value)
                    while self._live_dtmf:
                        digit = self._live_dtmf.pop(0)
                        await ws.send(self._message("dtmf", dtmf={"track": "inbound_track", "digit": digit}))
                    # Caller audio: one 20 ms frame per tick.
                    offset = round((tick * TICK - audio_at) * RATE)
                    frame = caller_ulaw[offset : offset + FRAME] if offset >= 0 else b""
                    if barge_in is not None and barge_at is None and True in tl.playing:
                        barge_at = tl.playing.index(True) * TICK + barge_in[1]
                    if barge_at is not None and tick * TICK >= barge_at:
                        offset = round((tick * TICK - barge_at) * RATE)
                        frame = barge_ulaw[offset : offset + FRAME]
                    if not frame and self._live:
                        frame = bytes(self._live[:FRAME])
                        del self._live[:FRAME]
                    frame = frame + ULAW_SILENCE[len(frame) :]
                    chunk += 1
                    await ws.send(
                        self._message(
                            "media",
                            media={
                                "track": "inbound",
                                "chunk": str(chunk),
                                "timestamp": str(round(tick * TICK * 1000)),
                                "payload": base64.b64encode(frame).decode(),
                            },
                        )
                    )
                    # Playback: marks at the front had all their audio played by now.
                    while queue and queue[0][0] == "mark":
                        await echo(queue.popleft()[1])
                    out = bytearray()
                    while queue and len(out) < FRAME:
                        kind, item = queue[0]
                        if kind == "mark":
                            break  # the next tick echoes it, once this audio has played
                        take = item[: FRAME - len(out)]
                        out += take
                        del item[: len(take)]
                        if not item:
                            queue.popleft()
                    tl.playing.append(bool(out))
                    heard.append(ulaw_decode(bytes(out)) if out else np.zeros(0, np.int16))
                    if len(out) < FRAME:
                        heard.append(np.zeros(FRAME - len(out), np.int16))
                if send_stop and vanish_at is None and not receiver.done():
                    await ws.send(
                        self._message("stop", stop={"accountSid": self.account_sid, "callSid": self.call_sid})
                    )
                    await ws.close()
            except websockets.ConnectionClosed:
                pass
            finally:
                if vanish_at is not None:
                    receiver.cancel()
                try:
                    await asyncio.wait_for(receiver, timeout=5)
                except (TimeoutError, asyncio.CancelledError):
                    receiver.cancel()
        tl.barge_in_at = barge_at
        tl.heard = np.concatenate(heard) if heard else np.zeros(0, np.int16)
        return tl


async def fetch_voice_twiml(
    http_base: str, auth_token: str, *, public_base: str, form: dict[str, str], signature: str | None = None
) -> httpx.Response:
    """POST the voice webhook like Twilio: form-encoded, signed over the public URL and the form."""
    if signature is None:
        signature = RequestValidator(auth_token).compute_signature(
            public_base.rstrip("/") + "/twilio/voice", form
        )
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if signature:
        headers["X-Twilio-Signature"] = signature
    async with httpx.AsyncClient() as client:
        return await client.post(
            http_base.rstrip("/") + "/twilio/voice", content=urlencode(form), headers=headers
        )
