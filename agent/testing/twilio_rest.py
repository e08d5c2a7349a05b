"""A stand-in for Twilio's REST API placing calls, and for the phones it calls, for tests.

    async with TwilioRest.running(ACCOUNT, TOKEN) as cloud:     # cloud.url: the API base to point at
        cloud.callee("+15551230000", Callee(answered_by="machine_end_beep", audio=greeting))
        async with serving(app) as host:
            cloud.server = host                                 # where Twilio's requests go
            ...                                                 # the agent places calls

Like Twilio (shared docs, telephony facts 2.6 and 2.7; the Calls resource and AMD references):
`POST /2010-04-01/Accounts/{sid}/Calls.json` needs HTTP Basic auth with the account SID and auth token
(else 401, error 20003), a `To` and `From` in E.164 (else 400, 21211 / 21212, messages quoting the
field) and `Twiml`; it answers 201 with the call (`sid`, `status: queued`). Then the call goes on by
itself: status callbacks for the events asked for (`initiated`, `ringing`, `answered`) and always the
final one (`completed`, `busy`, `no-answer`, `failed`, `canceled`), each form-encoded and signed with
X-Twilio-Signature; on answer, the TwiML's `<Connect><Stream>` is opened against the server by the
Media Stream stand-in (agent/testing/twilio_caller.py); with `MachineDetection` and `AsyncAmd`, the
verdict (`AnsweredBy`) is posted to `AsyncAmdStatusCallback`. `POST .../Calls/{sid}.json` with
`Status=completed|canceled` or TwiML holding `<Hangup/>` ends the call.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from twilio.request_validator import RequestValidator

from transports.addresses import E164

from .lines import LINES, TwilioLine, _switched_on, serving
from .twilio_caller import Timeline, TwilioCaller

SIP_RESPONSE = {"busy": "486", "no-answer": "487", "failed": "404"}
ANSWER_TIMEOUT_SECS = 20.0


@dataclass
class Callee:
    """How the called phone behaves.

    ``pickup``: answer after ``ring_secs``, or end as busy, no-answer or failed (Twilio's statuses), or
    ``invalid``: Twilio refuses the create request (400, error 21211). Once answered, the callee says
    ``audio`` (int16, 8 kHz) from ``audio_at`` seconds and stays on for ``seconds``; ``script`` (given the
    live TwilioCaller) runs alongside, to say, press and hang up as the call goes. ``answered_by`` is
    what Twilio's machine detection reports, ``amd_secs`` after pickup, when the call asked for it
    (``amd_secs`` None: only when `TwilioRest.report_amd` is called).
    """

    pickup: Literal["answer", "busy", "no-answer", "failed", "invalid"] = "answer"
    ring_secs: float = 0.2
    audio: np.ndarray | None = None
    audio_at: float = 0.5
    seconds: float = 6.0
    script: Callable[[TwilioCaller], Awaitable[None]] | None = None
    answered_by: str = "human"
    amd_secs: float | None = 1.0
    connects: bool = True  # False: answered, but the TwiML's stream never opens (for ``seconds``)


@dataclass(eq=False)
class CloudCall:
    """One call the stand-in placed: the create request, what it posted back, and the stream."""

    sid: str
    form: dict[str, list[str]]
    callee: Callee
    callbacks: list[tuple[str, dict[str, str], int]] = field(default_factory=list)  # (url, form, HTTP status)
    updates: list[dict[str, list[str]]] = field(default_factory=list)
    caller: TwilioCaller | None = None
    timeline: Timeline | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    _hang_up: asyncio.Event = field(default_factory=asyncio.Event)

    def one(self, name: str) -> str | None:
        values = self.form.get(name)
        return values[0] if values else None

    @property
    def statuses(self) -> list[str]:
        """The CallStatus of each status callback, in order."""
        return [form["CallStatus"] for _url, form, _code in self.callbacks if "CallStatus" in form]


def _error(status: int, code: int, message: str) -> JSONResponse:
    return JSONResponse(
        {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}", "status": status},
        status_code=status,
    )


class TwilioRest:
    def __init__(self, account_sid: str, auth_token: str):
        self.account_sid, self.auth_token = account_sid, auth_token
        self.url: str = ""  # the API base, once running
        self.server: str | None = None  # host:port of the agent's server, where Twilio's requests go
        self.calls: list[CloudCall] = []
        self.requests: list[dict] = []  # every request: method, path, form
        self._callees: dict[str, Callee] = {}
        self._tasks: set[asyncio.Task] = set()
        self.app = self._app()

    def callee(self, number: str, behaviour: Callee) -> None:
        self._callees[number] = behaviour

    def call(self, sid: str) -> CloudCall:
        return next(c for c in self.calls if c.sid == sid)

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, account_sid: str, auth_token: str) -> AsyncIterator[TwilioRest]:
        cloud = cls(account_sid, auth_token)
        async with serving(cloud.app) as host:
            cloud.url = f"http://{host}"
            try:
                yield cloud
            finally:
                for task in list(cloud._tasks):
                    task.cancel()
                await asyncio.gather(*cloud._tasks, return_exceptions=True)

    # -- the REST API --

    def _authorized(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        return scheme.lower() == "basic" and value == expected

    def _app(self) -> FastAPI:
        app = FastAPI()
        prefix = "/2010-04-01/Accounts/{account}/Calls"

        @app.post(prefix + ".json")
        async def create(account: str, request: Request) -> Response:
            form = parse_qs((await request.body()).decode(), keep_blank_values=True)
            self.requests.append({"method": "POST", "path": request.url.path, "form": form})
            if not self._authorized(request) or account != self.account_sid:
                return _error(401, 20003, "Authenticate")
            to, from_ = form.get("To", [""])[0], form.get("From", [""])[0]
            if not to:
                return _error(400, 21201, "No 'To' number is specified")
            callee = self._callees.get(to, Callee())
            if not E164.fullmatch(to) or callee.pickup == "invalid":
                return _error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
            if not E164.fullmatch(from_):
                return _error(400, 21212, f"The 'From' number {from_} is not a valid phone number, shortcode, or alphanumeric sender ID.")
            if "Twiml" not in form and "Url" not in form:
                return _error(400, 21205, "Url parameter is required.")
            call = CloudCall("CA" + uuid.uuid4().hex, form, callee)
            self.calls.append(call)
            self._spawn(self._drive(call))
            return JSONResponse(
                {"sid": call.sid, "account_sid": self.account_sid, "to": to, "from": from_, "status": "queued"},
                status_code=201,
            )

        @app.post(prefix + "/{sid}.json")
        async def update(account: str, sid: str, request: Request) -> Response:
            form = parse_qs((await request.body()).decode(), keep_blank_values=True)
            self.requests.append({"method": "POST", "path": request.url.path, "form": form})
            if not self._authorized(request) or account != self.account_sid:
                return _error(401, 20003, "Authenticate")
            call = next((c for c in self.calls if c.sid == sid), None)
            if call is None:
                return _error(404, 20404, f"The requested resource {request.url.path} was not found")
            call.updates.append(form)
            status = form.get("Status", [""])[0]
            twiml = form.get("Twiml", [""])[0]
            if status in ("completed", "canceled") or "<Hangup" in twiml:
                call._hang_up.set()
            return JSONResponse({"sid": sid, "account_sid": self.account_sid, "status": "in-progress"})

        return app

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the call, as Twilio drives it --

    async def _post(self, call: CloudCall, url: str | None, fields: dict[str, str]) -> None:
        """A signed callback to the public URL ``url``, sent to the agent's server."""
        if not url or self.server is None:
            return
        form = {
            "AccountSid": self.account_sid,
            "CallSid": call.sid,
            "From": call.one("From") or "",
            "To": call.one("To") or "",
            "Direction": "outbound-api",
            "ApiVersion": "2010-04-01",
            **fields,
        }
        signature = RequestValidator(self.auth_token).compute_signature(url, form)
        parts = urlsplit(url)
        local = f"http://{self.server}{parts.path}" + (f"?{parts.query}" if parts.query else "")
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(local, data=form, headers={"X-Twilio-Signature": signature})
        call.callbacks.append((url, form, r.status_code))

    async def _status(self, call: CloudCall, status: str, event: str, sequence: list[int], **extra: str) -> None:
        asked = call.form.get("StatusCallbackEvent", [])
        if event != "completed" and event not in asked:
            return
        sequence[0] += 1
        fields = {"CallStatus": status, "CallbackSource": "call-progress-events", "SequenceNumber": str(sequence[0] - 1)}
        await self._post(call, call.one("StatusCallback"), {**fields, **extra})

    async def _drive(self, call: CloudCall) -> None:
        callee, sequence = call.callee, [0]
        try:
            await asyncio.sleep(0.05)  # the create request's answer is on its way first
            await self._status(call, "initiated", "initiated", sequence)
            await self._status(call, "ringing", "ringing", sequence)
            ring = asyncio.create_task(call._hang_up.wait())
            await asyncio.wait({ring}, timeout=callee.ring_secs)
            ring.cancel()
            if call._hang_up.is_set():
                await self._status(call, "canceled", "completed", sequence)
                return
            if callee.pickup != "answer":
                await self._status(
                    call, callee.pickup, "completed", sequence, SipResponseCode=SIP_RESPONSE[callee.pickup]
                )
                return
            answered = time.monotonic()
            await self._status(call, "in-progress", "answered", sequence)
            await self._talk(call)
            duration = str(round(time.monotonic() - answered))
            await self._status(call, "completed", "completed", sequence, CallDuration=duration)
        finally:
            call.ended.set()

    async def _talk(self, call: CloudCall) -> None:
        """The answered call: the stream the TwiML names, the callee on it, and the AMD verdict."""
        stream = ET.fromstring(call.one("Twiml") or "<Response/>").find("Connect/Stream")
        if stream is None or self.server is None:
            return
        if not call.callee.connects:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(call._hang_up.wait(), call.callee.seconds)
            return
        params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
        path = urlsplit(stream.get("url")).path
        caller = call.caller = TwilioCaller(
            f"ws://{self.server}{path}", self.auth_token, sign_url=stream.get("url"), parameters=params,
            call_sid=call.sid,
        )
        callee = call.callee
        helpers = []
        if callee.amd_secs is not None:
            helpers.append(asyncio.create_task(self._amd(call, callee.amd_secs)))
        if callee.script is not None:
            helpers.append(asyncio.create_task(self._script(caller, callee.script)))
        helpers.append(asyncio.create_task(self._hang_up_when_asked(call)))
        try:
            call.timeline = await caller.run(callee.audio, audio_at=callee.audio_at, seconds=callee.seconds)
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    async def _amd(self, call: CloudCall, after_secs: float) -> None:
        await asyncio.sleep(after_secs)
        await self.report_amd(call, call.callee.answered_by, after_secs)

    async def report_amd(self, call: CloudCall, answered_by: str, after_secs: float) -> None:
        """Post machine detection's verdict, if the call asked for it (MachineDetection with AsyncAmd)."""
        if call.one("MachineDetection") not in ("Enable", "DetectMessageEnd") or call.one("AsyncAmd") != "true":
            return
        fields = {"AnsweredBy": answered_by, "MachineDetectionDuration": str(round(after_secs * 1000))}
        await self._post(call, call.one("AsyncAmdStatusCallback"), fields)

    async def _script(self, caller: TwilioCaller, script: Callable[[TwilioCaller], Awaitable[None]]) -> None:
        while caller.t0 is None:  # the stream is not open yet
            await asyncio.sleep(0.01)
        await script(caller)

    async def _hang_up_when_asked(self, call: CloudCall) -> None:
        await call._hang_up.wait()
        call.caller.hang_up()


# The conversation-test line -------------------------------------------------------------------------


class OutboundTwilioLine(TwilioLine):
    """The agent calls over Twilio: it places the call (agent.outbound.place_call) through the REST
    stand-in, whose callee answers; the scenario's turns are what the callee says. Twilio's machine
    detection says "human" once the callee's first words are followed by its speech-end silence, as
    Twilio's does. `placed` is the placed call, its outcome and who answered."""

    transport = "twilio-outbound"
    CALLEE = "+15550100000"
    CALLER_ID = "+15550109999"
    SPEECH_END_SECS = 1.2  # Twilio's MachineDetectionSpeechEndThreshold default

    @classmethod
    def adapt(cls, spec):
        return _switched_on(
            spec, "twilio", auth_token=cls.TOKEN, account_sid=cls.ACCOUNT, public_url=cls.PUBLIC, from_number=cls.CALLER_ID
        )

    def __init__(self, runtime):
        super().__init__(runtime)
        self.placed = None
        self._cloud: TwilioRest | None = None
        self._cloud_call: CloudCall | None = None
        self._verdict: asyncio.Task | None = None

    async def open(self) -> None:
        from agent.lines.twilio import twilio_router
        from agent.outbound import place_call, placed_call

        cloud = self._cloud = await self._stack.enter_async_context(TwilioRest.running(self.ACCOUNT, self.TOKEN))
        # Twilio's API is the stand-in, known only now that it listens.
        self.runtime.spec = _switched_on(self.runtime.spec, "twilio", api_url=cloud.url)
        app = FastAPI()
        app.include_router(twilio_router(self.runtime, self.PUBLIC))
        cloud.server = await self._stack.enter_async_context(serving(app))
        cloud.callee(self.CALLEE, Callee(seconds=3600, amd_secs=None))
        self.placed = placed_call(self.runtime, await place_call(self.runtime, self.CALLEE))
        deadline = time.monotonic() + ANSWER_TIMEOUT_SECS
        while self.placed.call is None or not cloud.calls or cloud.calls[0].caller is None or cloud.calls[0].caller.t0 is None:
            if self.placed.done or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the agent's call over Twilio was not answered: {self.placed.outcome} {self.placed.detail}"
                )
            await asyncio.sleep(0.01)
        self._cloud_call = cloud.calls[0]
        self._caller = self._cloud_call.caller
        self.call = self.placed.call
        self.t0 = self._caller.t0

    async def say(self, pcm: np.ndarray) -> tuple[float, float]:
        start, end = await super().say(pcm)
        if self._verdict is None:
            self._verdict = asyncio.create_task(self._human_after(end))
        return start, end

    async def _human_after(self, speech_end: float) -> None:
        await asyncio.sleep(max(0.0, speech_end + self.SPEECH_END_SECS - self.now()))
        await self._cloud.report_amd(self._cloud_call, "human", self.now())

    @property
    def caller_sending(self) -> bool:
        # Until Twilio's verdict the callee's words are held back from the agent: still on their way.
        return super().caller_sending or (self._verdict is not None and not self._verdict.done())

    @property
    def ended(self) -> bool:
        return self._cloud_call is not None and self._cloud_call.timeline is not None

    async def close(self) -> None:
        if self._verdict is not None:
            self._verdict.cancel()
            await asyncio.gather(self._verdict, return_exceptions=True)
        if self._caller is not None:
            self._caller.hang_up()
        if self._cloud_call is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._cloud_call.ended.wait(), 10)
        await self._wait_call_gone()
        if self.placed is not None:
            await self.placed.wait(10.0)
        await self._stack.aclose()


LINES[OutboundTwilioLine.transport] = OutboundTwilioLine
