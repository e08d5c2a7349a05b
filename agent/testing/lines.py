"""The caller's end of one call, per transport: what a conversation test speaks into and listens at.

Every line offers the same few things, so one scenario runs over any of them:

    line = LINES["twilio"](runtime)   # or "inprocess", "sip", "webrtc"
    await line.open()                  # dial; line.call is then the agent's side of this call
    start, end = await line.say(pcm)   # int16 at line.rate, sent in real time (seconds on the line's clock)
    await line.press("12#")
    line.heard()                       # [(t, loud)] per 20 ms of agent audio at the wire
    line.ended                         # the far end hung up (the agent ended or transferred the call)
    await line.close()                 # the caller hangs up if still on; the agent's call is waited for

The line's clock is seconds since `open()` on `time.monotonic()`, the clock the agent's call notes
its own events on (`Call.timeline`), so both sides land on one time axis. "At the wire" means what
the caller's end received: the file transport's output (in-process), Twilio's playback of the media
stream (the stand-in plays it on a 20 ms clock), baresip's decoding of the RTP (SIP), or the browser's audio
graph rendering the remote track, after its jitter buffer (WebRTC).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import shutil
import socket
import tempfile
import time
import xml.etree.ElementTree as ET
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI
from loguru import logger

from processors.audio_io import PCM16_SCALE

from ..call import Call
from ..runtime import AgentRuntime
from .inprocess import InProcessCall

SLOT = 0.02  # seconds per unit of heard audio
LOUD_RMS = 150.0  # int16 RMS above which 20 ms of agent audio counts as sound (about -47 dBFS)


def loud(samples: np.ndarray) -> bool:
    return samples.size > 0 and float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) > LOUD_RMS


def slots(samples: np.ndarray, rate: int, start: float) -> list[tuple[float, bool]]:
    """int16 audio starting at `start` seconds as (time, loud) per 20 ms."""
    n = max(1, int(rate * SLOT))
    return [(start + i / rate, loud(samples[i : i + n])) for i in range(0, len(samples), n)]


class Line(ABC):
    transport = ""
    rate = 16000

    def __init__(self, runtime: AgentRuntime):
        self.runtime = runtime
        self.call: Call | None = None
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    @classmethod
    def adapt(cls, spec):
        """The agent file as this line needs it (a transport switched on, on local addresses)."""
        return spec

    @abstractmethod
    async def open(self) -> None:
        """Dial the agent; `call` is then the agent's side of this call."""

    @abstractmethod
    async def say(self, pcm: np.ndarray) -> tuple[float, float]:
        """Send int16 caller audio at `rate` in real time; (start, end) on the line's clock."""

    @abstractmethod
    async def press(self, digits: str) -> None:
        """Press keys on the caller's phone."""

    @abstractmethod
    def heard(self) -> list[tuple[float, bool]]:
        """(time, loud) per 20 ms of agent audio received at the wire, so far."""

    @property
    @abstractmethod
    def ended(self) -> bool:
        """The far end hung up."""

    @abstractmethod
    async def close(self) -> None:
        """Hang up if still on, and wait for the agent's call to end."""

    @property
    def caller_sending(self) -> bool:
        """Caller audio is still queued to go out."""
        return False

    def agent_busy(self, quiet_secs: float = 0.4) -> bool:
        """The agent is hearing a turn, generating, or was heard within `quiet_secs`."""
        if self.caller_sending:
            return True
        service = self.call.service if self.call is not None else None
        if service is not None and (service.hearing or service.speaking):
            return True
        recent = [t for t, is_loud in self.heard()[-int(quiet_secs / SLOT) - 1 :] if is_loud]
        return bool(recent) and self.now() - recent[-1] < quiet_secs

    async def _find_call(self, known: set[str], timeout: float = 10.0) -> Call:
        for _ in range(int(timeout / 0.02)):
            new = [c for cid, c in self.runtime.calls.items() if cid not in known]
            if new:
                return new[0]
            await asyncio.sleep(0.02)
        raise RuntimeError(f"no {self.transport} call reached the agent within {timeout:g} s")

    async def _wait_call_gone(self, timeout: float = 10.0) -> None:
        if self.call is None:
            return
        for _ in range(int(timeout / 0.02)):
            if self.call.stats.call_id not in self.runtime.calls:
                return
            await asyncio.sleep(0.02)
        logger.warning(f"{self.transport} line: the agent's call {self.call.stats.call_id} did not end in {timeout:g} s")


def _switched_on(spec, transport: str, **settings):
    """The agent file with one transport enabled (and `settings` set in its section), all else as it was."""
    section = getattr(spec.transports, transport).model_copy(update={"enabled": True, **settings})
    return spec.model_copy(update={"transports": spec.transports.model_copy(update={transport: section})})


class InProcessLine(Line):
    """The file transport, live, in this process: no network, no codec."""

    transport = "inprocess"

    def __init__(self, runtime: AgentRuntime, rate: int = 16000):
        super().__init__(runtime)
        self.rate = rate
        self._line = InProcessCall(runtime, rate=rate, out_rate=rate)
        self.call = self._line.call
        self._offset = 0.0  # the file transport's clock zero on this line's clock
        self._heard: list[tuple[float, bool]] = []
        self._measured = 0

    async def open(self) -> None:
        self.t0 = time.monotonic()
        await self._line.__aenter__()
        self._offset = self._line.transport.clock.t0 - self.t0  # loop.time() is time.monotonic()

    async def say(self, pcm: np.ndarray) -> tuple[float, float]:
        start, end = await self._line.say(pcm)
        return start + self._offset, end + self._offset

    async def press(self, digits: str) -> None:
        await self._line.press(digits)

    @property
    def caller_sending(self) -> bool:
        return self._line.transport.caller_busy

    def heard(self) -> list[tuple[float, bool]]:
        chunks = self._line.transport.agent_chunks
        for start, rate, samples in chunks[self._measured :]:  # each chunk measured once
            self._heard += slots(samples, rate, start + self._offset)
        self._measured = len(chunks)
        return self._heard

    @property
    def ended(self) -> bool:
        return self._line.ended

    async def close(self) -> None:
        await self._line.hang_up()


@contextlib.asynccontextmanager
async def serving(app: FastAPI):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            raise RuntimeError("the local server for the agent did not start")
        await asyncio.sleep(0.02)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


class TwilioLine(Line):
    """Twilio's wire, with Twilio played by stand-ins: the agent's real routes (signed webhook, signed
    media stream) on a local server, a caller speaking 8 kHz mu-law in 20 ms `media` messages that
    plays the agent's audio on a 20 ms clock and echoes marks and `clear` as Twilio does, and a local
    REST API taking the agent's hang-up and transfer."""

    transport = "twilio"
    rate = 8000
    PUBLIC = "https://agent.test.invalid"
    TOKEN = "scenario-auth-token"
    ACCOUNT = "AC" + "0" * 32

    @classmethod
    def adapt(cls, spec):
        return _switched_on(spec, "twilio", auth_token=cls.TOKEN, account_sid=cls.ACCOUNT, public_url=cls.PUBLIC)

    def __init__(self, runtime: AgentRuntime):
        super().__init__(runtime)
        self._stack = contextlib.AsyncExitStack()
        self._caller = None
        self._run: asyncio.Task | None = None

    async def open(self) -> None:
        from agent.lines.twilio import twilio_router

        from .twilio_caller import TwilioCaller, fetch_voice_twiml, sid
        from .twilio_cloud import LocalTwilioCloud

        cloud = self._stack.enter_context(LocalTwilioCloud.running(self.ACCOUNT, self.TOKEN))
        app = FastAPI()
        app.include_router(twilio_router(self.runtime, self.PUBLIC, rest_client=cloud.client))
        host = await self._stack.enter_async_context(serving(app))
        known = set(self.runtime.calls)
        call_sid = sid("CA")
        response = await fetch_voice_twiml(
            f"http://{host}", self.TOKEN, public_base=self.PUBLIC, form={"CallSid": call_sid, "From": "+15550100000"}
        )
        if response.status_code != 200:
            raise RuntimeError(f"the agent's Twilio webhook answered {response.status_code}: {response.text[:200]}")
        stream = ET.fromstring(response.text).find("Connect/Stream")
        params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
        self._caller = TwilioCaller(
            f"ws://{host}/twilio/media", self.TOKEN, sign_url=stream.get("url"), parameters=params, call_sid=call_sid
        )
        self._run = asyncio.create_task(self._caller.run(seconds=3600))
        self.call = await self._find_call(known)
        while self._caller.t0 is None:
            await asyncio.sleep(0.01)
        self.t0 = self._caller.t0  # the stream's start is the line's zero

    async def say(self, pcm: np.ndarray) -> tuple[float, float]:
        start = self._caller.say(pcm)
        end = start + len(pcm) / self.rate
        while self.now() < end and not self.ended:
            await asyncio.sleep(0.02)
        return start, end

    async def press(self, digits: str) -> None:
        for digit in digits:
            self._caller.press(digit)
            await asyncio.sleep(0.1)

    @property
    def caller_sending(self) -> bool:
        return self._caller is not None and self._caller.saying

    def heard(self) -> list[tuple[float, bool]]:
        from .twilio_caller import TICK

        timeline = self._caller.timeline
        return [(i * TICK, on) for i, on in enumerate(list(timeline.playing))]

    @property
    def ended(self) -> bool:
        return self._run is not None and self._run.done()

    async def close(self) -> None:
        if self._caller is not None:
            self._caller.hang_up()
        if self._run is not None:
            await asyncio.gather(self._run, return_exceptions=True)
        await self._wait_call_gone()
        await self._stack.aclose()


class SipLine(Line):
    """Plain SIP over UDP on 127.0.0.1: the agent's SIP server, called by baresip (INVITE with PCMU, RTP
    both ways every 20 ms, RFC 4733 keys, BYE). The agent's audio is timed as baresip decodes it."""

    transport = "sip"
    rate = 8000
    PAD_SECS = 10.0  # silence after each utterance, so a late switch back cannot run the file out

    def __init__(self, runtime: AgentRuntime):
        super().__init__(runtime)
        self._server = None
        self._phone = None
        self._folder: Path | None = None
        self._said_until = 0.0
        self._heard: list[tuple[float, bool]] = []
        self._utterances = 0

    async def open(self) -> None:
        from agent.lines.sip import sip_server

        from .baresip import Baresip

        spec = self.runtime.spec.transports.sip.model_copy(
            update={"enabled": True, "host": "127.0.0.1", "port": 0, "auth": None, "allow": ["127.0.0.1"]}
        )
        self._server = sip_server(self.runtime, spec)
        await self._server.start()
        self._folder = Path(tempfile.mkdtemp(prefix="chroma-sip-line-"))
        known = set(self.runtime.calls)
        self.t0 = time.monotonic()
        self._phone = await Baresip.start(self._folder, f"sip:agent@127.0.0.1:{self._server.port}")
        self.call = await self._find_call(known)

    async def say(self, pcm: np.ndarray) -> tuple[float, float]:
        from .baresip import write_pcm

        self._utterances += 1
        padded = np.concatenate([pcm.astype(np.int16), np.zeros(int(self.PAD_SECS * self.rate), np.int16)])
        wav = write_pcm(self._folder / f"say{self._utterances}.wav", padded, self.rate)
        started = await self._phone.play(wav) - self.t0
        end = started + len(pcm) / self.rate
        self._said_until = end
        while self.now() < end and not self.ended:
            await asyncio.sleep(0.02)
        if not self._phone.closed.is_set():
            await self._phone.play(self._phone.silence)
        return started, end

    async def press(self, digits: str) -> None:
        from .baresip import KEY_SECS

        for digit in digits:
            await self._phone.press(digit)
            await asyncio.sleep(KEY_SECS)

    @property
    def caller_sending(self) -> bool:
        return self.now() < self._said_until

    def heard(self) -> list[tuple[float, bool]]:
        if self._phone is not None and self._folder is not None:
            self._heard += [(t - self.t0, loud(chunk)) for t, chunk in self._phone.heard()]
        return self._heard

    @property
    def ended(self) -> bool:
        return self._phone is not None and self._phone.ended

    async def close(self) -> None:
        try:
            if self._phone is not None:
                self.heard()
                await self._phone.close()
            await self._wait_call_gone()
        finally:
            if self._server is not None:
                await self._server.stop()
            if self._folder is not None:
                shutil.rmtree(self._folder, ignore_errors=True)
                self._folder = None  # all that was heard has been read


class WebRTCLine(Line):
    """A real browser: the agent's server (its page and `/api/offer`) on 127.0.0.1, and headless Chromium
    calling it over WebRTC (Opus at 48 kHz, ICE, DTLS-SRTP). The caller's voice is played into a WebAudio
    stream standing in for the microphone; keys go over the data channel. The browser keeps times on its
    AudioContext clock; the line maps them onto its own from round trips it times."""

    transport = "webrtc"
    rate = 48000
    POLL_SECS = 0.04
    CONNECT_TIMEOUT_SECS = 20.0
    TAIL_SECS = 0.3

    @classmethod
    def adapt(cls, spec):
        return _switched_on(spec, "webrtc")

    def __init__(self, runtime: AgentRuntime):
        super().__init__(runtime)
        self._stack = contextlib.AsyncExitStack()
        self._page = None
        self._poll: asyncio.Task | None = None
        self._state = "new"
        self._error = None
        self._offsets: collections.deque[tuple[float, float]] = collections.deque(maxlen=25)  # (rtt, offset)
        self._heard: list[tuple[float, bool]] = []
        self._said_until = 0.0

    async def open(self) -> None:
        from agent.server import create_app

        from .browser import Page, chromium

        host = await self._stack.enter_async_context(serving(create_app(self.runtime)))
        # Host candidates as plain addresses rather than mDNS names: aioice resolves those through one lock
        # per process that is bound to the first event loop using it, so a second run in another loop
        # (asyncio.run per test) could not answer the offer. The call is local; nothing is hidden.
        devtools = await self._stack.enter_async_context(chromium("--disable-features=WebRtcHideLocalIpsWithMdns"))
        self._page = await self._stack.enter_async_context(Page.open(devtools, f"http://{host}/"))
        await self._page.evaluate((Path(__file__).parent / "webrtc_caller.js").read_text())
        known = set(self.runtime.calls)
        self.t0 = time.monotonic()
        await self._page.evaluate("chromaCaller.dial('/api/offer')")
        self.call = await self._find_call(known)
        await self._take()
        self._poll = asyncio.create_task(self._polling())
        deadline = self.now() + self.CONNECT_TIMEOUT_SECS
        while self._state == "connecting" and self.now() < deadline:
            await asyncio.sleep(0.02)
        if self._state != "connected":
            raise RuntimeError(f"the browser's call did not connect ({self._state}: {self._error})")

    def _line_time(self, context_time: float) -> float:
        # The offset of the round trip that was quickest recently: the least uncertain one.
        return context_time - min(self._offsets)[1]

    async def _take(self) -> None:
        before = time.monotonic()
        taken = await self._page.evaluate("chromaCaller.take()")
        after = time.monotonic()
        self._offsets.append((after - before, taken["now"] - ((before + after) / 2 - self.t0)))
        self._state, self._error = taken["state"], taken["error"]
        self._heard += [(self._line_time(t), rms * PCM16_SCALE > LOUD_RMS) for t, rms in taken["heard"]]

    async def _polling(self) -> None:
        while True:
            await asyncio.sleep(self.POLL_SECS)
            try:
                await self._take()
            except Exception as exc:  # the tab or browser went away: nothing more will be heard
                self._state, self._error = "failed", f"{type(exc).__name__}: {exc}"
                return

    async def say(self, pcm: np.ndarray) -> tuple[float, float]:
        audio = base64.b64encode(pcm.astype("<i2").tobytes()).decode()
        start, end = await self._page.evaluate(f"chromaCaller.say('{audio}', {self.rate})")
        start, end = self._line_time(start), self._line_time(end)
        self._said_until = end
        while self.now() < end and not self.ended:
            await asyncio.sleep(0.02)
        return start, end

    async def press(self, digits: str) -> None:
        for digit in digits:
            await self._page.evaluate(f"chromaCaller.press({json.dumps(digit)})")
            await asyncio.sleep(0.1)

    @property
    def caller_sending(self) -> bool:
        return self.now() < self._said_until

    def heard(self) -> list[tuple[float, bool]]:
        return self._heard

    @property
    def ended(self) -> bool:
        return self._state in ("ended", "failed")

    async def close(self) -> None:
        try:
            if self._poll is not None:
                self._poll.cancel()
                await asyncio.gather(self._poll, return_exceptions=True)
                if self._state == "ended":
                    # The agent hung up: the browser still plays out what its jitter buffer held.
                    await asyncio.sleep(self.TAIL_SECS)
                    with contextlib.suppress(Exception):
                        await self._take()
                if not self.ended:
                    with contextlib.suppress(Exception):
                        await self._page.evaluate("chromaCaller.hangUp()")
            await self._wait_call_gone()
        finally:
            await self._stack.aclose()


LINES = {"inprocess": InProcessLine, "twilio": TwilioLine, "sip": SipLine, "webrtc": WebRTCLine}

# "sip-outbound": the agent places the call to a scripted callee (callee.py adds its line to LINES);
# "twilio-outbound": the agent places the call over Twilio's REST stand-in (twilio_rest.py adds it).
from . import callee, twilio_rest  # noqa: E402, F401

