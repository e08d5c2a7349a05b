"""Calls the agent places over Twilio: the REST request that creates one, and what Twilio reports about
it afterwards (status callbacks, answering-machine detection), kept on the call's `PlacedCall`.

    app.include_router(twilio_router(runtime, "https://agent.example.com"))   # sets up a TwilioDialOut
    call_id = await place_call(runtime, "+15551234567", state={"appointment": "Tue 10:00"})

The create request carries the call's TwiML (`Twiml=`): the same signed `<Connect><Stream>` an inbound
call gets, so Twilio opens the stream the moment the callee picks up, with no webhook round trip while
they say hello. The call SID does not exist when that TwiML is written, so the stream's token is bound
to our id for the call and lives as long as the call may ring; the media route checks it, and that the
stream belongs to the call SID Twilio returned.

Who answered is Twilio's answering-machine detection, asynchronous (the stream runs while it listens):
`Enable` when the agent hangs up on machines (the verdict comes as soon as Twilio knows), and
`DetectMessageEnd` when it leaves a message (the verdict waits for the end of the greeting, the beep).
Until the verdict, `VerdictGate` holds the callee's audio back from the agent: a person's "Hello?" then
reaches it (and the agent answers, as people expect), a machine's greeting never does;
`outbound.on_machine` is carried out as for calls over SIP (agent.outbound.machine_answered).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import httpx
from loguru import logger
from pipecat.frames.frames import Frame, InputAudioRawFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from transports.twilio_webhook import StreamTokens, connect_twiml, public_url

from .outbound import OutboundError, PlacedCall, machine_answered

if TYPE_CHECKING:
    from .call import Call
    from .runtime import AgentRuntime

API_VERSION = "2010-04-01"
REST_TIMEOUT_SECS = 10.0
# Twilio reports `completed` (or busy, no-answer, ...) once the ring timeout is up; past this margin a
# call it said nothing about is given up on and cancelled.
REPORT_GRACE_SECS = 30.0
# Twilio opens the stream right after reporting the call answered; a stream that never comes is a call
# the agent is not on, and is hung up.
STREAM_WAIT_SECS = 15.0
# After the agent's call has ended, how long to wait for Twilio's final `completed`.
END_GRACE_SECS = 15.0
FOLLOW_TICK_SECS = 0.25
# Twilio's detection gives up after this (its MachineDetectionTimeout, sent explicitly). A person is
# told within 2-3 s of their greeting (1.2 s of silence after it) and silence within 5 s, but a
# machine's verdict with DetectMessageEnd waits for the end of its greeting, however long.
AMD_TIMEOUT_SECS = 30
# The callee's audio is held back until the verdict; past this (no verdict came) the agent hears it.
HOLD_SECS = AMD_TIMEOUT_SECS + 5.0

STATUS_EVENTS = ("initiated", "ringing", "answered", "completed")
FINAL_STATUSES = frozenset({"completed", "busy", "no-answer", "failed", "canceled"})
# AMD's AnsweredBy values, as the call's outcome records them.
ANSWERED_BY = {
    "human": "human",
    "machine_start": "machine",
    "machine_end_beep": "machine",
    "machine_end_silence": "machine",
    "machine_end_other": "machine",
    "fax": "machine",
    "unknown": "unknown",  # nothing Twilio could tell (silence, say): the agent hears the callee
}
_CALL_SID = re.compile(r"CA[0-9a-fA-F]{32}")
_QUOTED_FIELD = re.compile(r"'([A-Z][A-Za-z]+)'")  # Twilio's messages quote the parameter at fault


class TwilioRequestError(RuntimeError):
    """Twilio refused or did not answer a REST request. The message names the field at fault when
    Twilio's does, and what was sent in it."""

    def __init__(self, message: str, *, status: int | None = None, code: int | None = None, field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.field = status, code, field


def request_error(response: httpx.Response, sent: dict) -> TwilioRequestError:
    """A clear error from Twilio's error body ({code, message, more_info, status})."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        text = response.text.strip().replace("\n", " ")[:200]
        return TwilioRequestError(f"Twilio answered HTTP {response.status_code}: {text or '(empty body)'}",
                                  status=response.status_code)
    code = body.get("code") if isinstance(body.get("code"), int) else None
    message = str(body.get("message") or "no message")
    found = _QUOTED_FIELD.search(message)
    field_name = found.group(1) if found else None
    text = f"Twilio refused the call (HTTP {response.status_code}, error {code}): {message}"
    if field_name is not None and field_name in sent:
        text += f" [field {field_name}: sent {sent[field_name]!r}]"
    if code == 20003:  # Twilio's "Authenticate": the account SID and auth token do not match
        text += " [check transports.twilio.account_sid and auth_token, or TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN]"
    if body.get("more_info"):
        text += f"; see {body['more_info']}"
    return TwilioRequestError(text, status=response.status_code, code=code, field=field_name)


@dataclass(eq=False)
class TwilioLeg:
    """One placed call as Twilio sees it: its SID and the statuses it reported."""

    placed: PlacedCall
    call_sid: str | None = None
    status: str | None = None  # Twilio's last CallStatus
    answered_at: float | None = None  # time.monotonic() of `in-progress`
    final_form: dict[str, str] = field(default_factory=dict)  # the callback that ended the call
    final: asyncio.Event = field(default_factory=asyncio.Event)
    gate: VerdictGate | None = None  # on the call's pipeline, once the stream is open
    twilio_answered_by: str | None = None  # AMD's own word (machine_end_beep, fax, ...)
    acting: asyncio.Task | None = None  # outbound.on_machine being carried out


class VerdictGate(FrameProcessor):
    """Holds the callee's audio back from the agent until Twilio's machine detection decides, or
    HOLD_SECS pass. A person (or a verdict of "unknown"): the held audio goes on, then everything
    after it. A machine: none of the callee's audio reaches the agent again."""

    def __init__(self, hold_secs: float = HOLD_SECS, *, name: str | None = None):
        super().__init__(name=name)
        self.hold_secs = hold_secs
        self.verdict: str | None = None
        self._held: list[InputAudioRawFrame] = []
        self._held_secs = 0.0
        self.passing = False

    def decide(self, answered_by: str) -> None:
        """Twilio's verdict; acted on with the next frame of the callee's audio (the pipeline's task)."""
        if self.verdict is None:
            self.verdict = answered_by

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if not (isinstance(frame, InputAudioRawFrame) and direction == FrameDirection.DOWNSTREAM):
            await self.push_frame(frame, direction)
            return
        if self.passing:
            await self.push_frame(frame)
            return
        if self.verdict == "machine":
            self._held = []
            return
        self._held.append(frame)
        self._held_secs += len(frame.audio) / 2 / max(1, frame.sample_rate)
        if self.verdict is not None or self._held_secs >= self.hold_secs:
            self.passing = True
            held, self._held = self._held, []
            for earlier in held:
                await self.push_frame(earlier)


class TwilioDialOut:
    """The server's Twilio side for calls it places: creates them over REST, and routes what Twilio
    reports back (callbacks, the media stream) to each one's `PlacedCall`. One per server, made by the
    Twilio routes: `twilio_dial_out(runtime)`."""

    def __init__(self, runtime: AgentRuntime, *, account_sid: str, auth_token: str, public_base: str, stream_url: str, agent: str):
        spec = runtime.spec
        self.runtime = runtime
        self.account_sid, self.auth_token = account_sid, auth_token
        self.api_url = spec.transports.twilio.api_url.rstrip("/")
        self.public_base, self.stream_url, self.agent = public_base, stream_url, agent
        self.from_number = spec.transports.twilio.from_number
        # Twilio's Timeout: whole seconds, 5 to 600
        self.ring_secs = max(5, min(600, round(spec.outbound.ring_timeout)))
        self.on_machine = spec.outbound.on_machine
        self.tokens = StreamTokens(secrets.token_bytes(32), ttl_secs=self.ring_secs + REPORT_GRACE_SECS)
        self.legs: dict[str, TwilioLeg] = {}  # by PlacedCall.id
        self._by_sid: dict[str, TwilioLeg] = {}

    # -- the create request --

    def callback_url(self, path: str, placed_id: str) -> str:
        return public_url(self.public_base, path, urlencode({"placed": placed_id}))

    def create_form(self, placed: PlacedCall) -> dict[str, str | list[str]]:
        """The form of `POST .../Calls.json` for this call."""
        caller_id = placed.from_ or self.from_number
        if not caller_id:
            raise OutboundError(
                "a call over Twilio needs a caller ID: set transports.twilio.from_number in the agent file "
                "or give the call a from number (--from, or \"from\" in POST /api/calls)"
            )
        token = self.tokens.issue(placed.id, self.agent)
        return {
            "To": placed.to,
            "From": caller_id,
            "Twiml": connect_twiml(self.stream_url, agent=self.agent, token=token, call_sid=placed.id),
            "Timeout": str(self.ring_secs),
            "StatusCallback": self.callback_url("/twilio/outbound/status", placed.id),
            "StatusCallbackMethod": "POST",
            "StatusCallbackEvent": list(STATUS_EVENTS),
            # Asynchronous, so the stream (and the agent, waiting for the callee's hello) runs meanwhile.
            "MachineDetection": "DetectMessageEnd" if self.on_machine == "leave_message" else "Enable",
            "MachineDetectionTimeout": str(AMD_TIMEOUT_SECS),
            "AsyncAmd": "true",
            "AsyncAmdStatusCallback": self.callback_url("/twilio/outbound/amd", placed.id),
            "AsyncAmdStatusCallbackMethod": "POST",
        }

    async def create(self, placed: PlacedCall) -> str:
        """Create the call; its SID. Raises TwilioRequestError when Twilio refuses or does not answer."""
        form = self.create_form(placed)
        url = f"{self.api_url}/{API_VERSION}/Accounts/{self.account_sid}/Calls.json"
        response = await self._post(url, form)
        if response.status_code not in (200, 201):
            raise request_error(response, form)
        try:
            sid = response.json().get("sid")
        except (ValueError, AttributeError):
            sid = None
        if not isinstance(sid, str) or not _CALL_SID.fullmatch(sid):
            raise TwilioRequestError(f"Twilio's answer to the create request has no call SID: {response.text[:200]!r}")
        return sid

    async def update(self, call_sid: str, **fields: str) -> None:
        """`POST .../Calls/{sid}.json` (Status=canceled or completed); raises TwilioRequestError."""
        url = f"{self.api_url}/{API_VERSION}/Accounts/{self.account_sid}/Calls/{call_sid}.json"
        response = await self._post(url, fields)
        if response.status_code not in (200, 201, 204):
            raise request_error(response, fields)

    async def _post(self, url: str, form: dict) -> httpx.Response:
        try:
            async with httpx.AsyncClient(timeout=REST_TIMEOUT_SECS) as client:
                return await client.post(url, data=form, auth=(self.account_sid, self.auth_token))
        except httpx.TimeoutException:
            raise TwilioRequestError(f"Twilio's REST API at {url} did not answer within {REST_TIMEOUT_SECS:.0f} s") from None
        except httpx.HTTPError as e:
            raise TwilioRequestError(f"could not reach Twilio's REST API at {url}: {type(e).__name__}: {e}") from None

    # -- what Twilio reports --

    def open(self, placed: PlacedCall) -> TwilioLeg:
        leg = self.legs[placed.id] = TwilioLeg(placed)
        return leg

    def created(self, leg: TwilioLeg, call_sid: str) -> None:
        if leg.call_sid is not None:
            return
        leg.call_sid = call_sid
        self._by_sid[call_sid] = leg
        leg.placed.note("created", call_sid=call_sid)

    def close(self, leg: TwilioLeg) -> None:
        self.legs.pop(leg.placed.id, None)
        if leg.call_sid is not None:
            self._by_sid.pop(leg.call_sid, None)

    def _leg(self, placed_id: str | None, form: dict[str, str]) -> TwilioLeg | None:
        leg = self.legs.get(placed_id or "")
        if leg is None:
            return None
        call_sid = form.get("CallSid", "")
        if leg.call_sid is None and _CALL_SID.fullmatch(call_sid):
            # Twilio's first callback can overtake its answer to the create request; the signed URL
            # names our call, so its SID is this call's.
            self.created(leg, call_sid)
        return leg if call_sid == leg.call_sid else None

    def status(self, placed_id: str | None, form: dict[str, str]) -> bool:
        """A status callback (already checked for Twilio's signature); False for a call not ours or over."""
        leg = self._leg(placed_id, form)
        if leg is None:
            return False
        status = form.get("CallStatus", "")[:32]
        if leg.final.is_set():  # a straggler after the call's end changes nothing
            return True
        leg.status = status
        if status == "ringing":
            leg.placed.note("ringing", via="twilio")
        else:
            extra = {k: form[f] for k, f in (("duration", "CallDuration"), ("sip_response", "SipResponseCode")) if f in form}
            leg.placed.note("twilio_status", status=status, **extra)
        if status == "in-progress" and leg.answered_at is None:
            leg.answered_at = time.monotonic()
        if status in FINAL_STATUSES:
            leg.final_form = dict(form)
            leg.final.set()
        return True

    def amd(self, placed_id: str | None, form: dict[str, str]) -> bool:
        """Twilio's answering-machine verdict (already checked for its signature)."""
        leg = self._leg(placed_id, form)
        answered_by = form.get("AnsweredBy", "")
        if leg is None or answered_by not in ANSWERED_BY:
            return False
        detection = {"twilio_answered_by": answered_by}
        with contextlib.suppress(ValueError):
            detection["seconds"] = int(form.get("MachineDetectionDuration", "")) / 1000
        if leg.placed.answered_by is not None:  # Twilio decides once; a repeat changes nothing
            return True
        verdict = ANSWERED_BY[answered_by]
        leg.twilio_answered_by = answered_by
        leg.placed.classified(verdict, **detection)
        if leg.gate is not None:
            leg.gate.decide(verdict)
        if verdict == "machine" and leg.placed.call is not None:
            self._act_on_machine(leg)
        return True

    def _act_on_machine(self, leg: TwilioLeg) -> None:
        # Not awaited here: the callback is answered at once, whatever speaking the message takes.
        action = _hang_up_on_fax(leg.placed) if leg.twilio_answered_by == "fax" else machine_answered(self.runtime, leg.placed)
        leg.acting = asyncio.get_running_loop().create_task(action, name=f"on-machine-{leg.placed.id}")

    def screen(self, leg: TwilioLeg) -> VerdictGate:
        """The gate for the call's pipeline (right after the transport's input)."""
        leg.gate = VerdictGate(name=f"twilio-amd-{leg.placed.id}")
        if leg.placed.answered_by is not None:  # the verdict came before the stream
            leg.gate.decide(leg.placed.answered_by)
        return leg.gate

    def started(self, leg: TwilioLeg, call: Call) -> None:
        """The stream is open and the agent's call exists: it starts its flow with the call's state."""
        leg.placed.attach(call)
        if leg.placed.answered_by == "machine":
            self._act_on_machine(leg)

    def leg_for_stream(self, call_sid: str) -> TwilioLeg | None:
        """For the media route: the placed call a stream's call SID belongs to; None for other calls."""
        return self._by_sid.get(call_sid)

    def redeem(self, leg: TwilioLeg, token: str | None) -> bool:
        """The stream's token is the one this call's TwiML carried, used once, and the call has no
        stream yet."""
        return leg.placed.call is None and self.tokens.redeem(token, leg.placed.id, self.agent)

    # -- one call, to its end --

    async def follow(self, leg: TwilioLeg) -> None:
        """Wait for Twilio's last word on the call (or give up on it), then finish the PlacedCall."""
        placed = leg.placed
        give_up_at = time.monotonic() + self.ring_secs + REPORT_GRACE_SECS
        while not leg.final.is_set():
            now, call = time.monotonic(), placed.call
            if call is None and leg.answered_at is None and now > give_up_at:
                await self._end(leg, "canceled")
                placed.finish("failed", f"Twilio reported nothing within {self.ring_secs + REPORT_GRACE_SECS:.0f} s")
                return
            if call is None and leg.answered_at is not None and now > leg.answered_at + STREAM_WAIT_SECS:
                await self._end(leg, "completed")
                placed.finish("failed", f"answered, but Twilio opened no media stream within {STREAM_WAIT_SECS:.0f} s")
                return
            if call is not None and call.stats.ended is not None and now > call.stats.ended + END_GRACE_SECS:
                placed.finish(detail="Twilio sent no final status after the call ended")
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(leg.final.wait(), FOLLOW_TICK_SECS)
        status = leg.status
        if status == "completed":
            if placed.call is None:
                placed.finish("failed", "answered, but the media stream never connected")
            else:
                placed.finish("answered")
        elif status in ("busy", "no-answer"):
            placed.finish(status, f"Twilio: {status}")
        else:
            sip = leg.final_form.get("SipResponseCode")
            placed.finish("failed", f"Twilio: {status}" + (f" (SIP {sip})" if sip else ""))

    async def _end(self, leg: TwilioLeg, status: str) -> None:
        """Best effort: cancel (not answered) or hang up (answered) a call we are giving up on."""
        if leg.call_sid is None:
            return
        try:
            await self.update(leg.call_sid, Status=status)
        except TwilioRequestError as e:
            logger.warning(f"outbound call {leg.placed.id}: could not set Twilio call {leg.call_sid} {status}: {e}")


async def _hang_up_on_fax(placed: PlacedCall) -> None:
    """A fax takes no message, whatever outbound.on_machine says."""
    call = placed.call
    if call is None or placed.done:
        return
    placed.note("hanging_up_on_fax")
    call.ended_by_agent = True
    call.note("agent_hung_up")
    await call.hang_up()


def twilio_dial_out(runtime: AgentRuntime) -> TwilioDialOut:
    """The server's TwilioDialOut; OutboundError saying what to set when Twilio calls cannot be placed."""
    dial_out = runtime.twilio_dial_out
    if dial_out is not None:
        return dial_out
    spec = runtime.spec.transports.twilio
    if not spec.enabled:
        need = "transports.twilio.enabled: true in the agent file"
    elif not (spec.account_sid or os.environ.get("TWILIO_ACCOUNT_SID")):
        need = "an account SID (transports.twilio.account_sid or TWILIO_ACCOUNT_SID)"
    else:  # set up, but no server: Twilio's stream and callbacks have nowhere to go
        need = "the agent's server, which Twilio streams the call to: chroma-agent serve, then POST /api/calls"
    raise OutboundError(
        f"calls to phone numbers go over Twilio here, which needs {need}; "
        "or set transports.sip.trunk to place them over SIP"
    )


def check_twilio_call(runtime: AgentRuntime, from_: str | None) -> None:
    """Raise OutboundError when a call over Twilio could not be placed as asked (before placing it)."""
    dial_out = twilio_dial_out(runtime)
    if not (from_ or dial_out.from_number):
        raise OutboundError(
            "a call over Twilio needs a caller ID: set transports.twilio.from_number in the agent file "
            "or give the call a from number"
        )


async def twilio_outbound(runtime: AgentRuntime, placed: PlacedCall) -> None:
    """The Twilio route of `place_call`: create the call, then follow it to its end."""
    dial_out = twilio_dial_out(runtime)
    leg = dial_out.open(placed)
    try:
        try:
            call_sid = await dial_out.create(placed)
        except TwilioRequestError as e:
            placed.finish("failed", str(e))
            return
        dial_out.created(leg, call_sid)
        logger.info(f"outbound call {placed.id}: Twilio call {call_sid} to {placed.to}")
        try:
            await dial_out.follow(leg)
        except asyncio.CancelledError:  # the server is stopping: leave no call ringing or running at Twilio
            if not leg.final.is_set():
                await dial_out._end(leg, "completed" if leg.answered_at else "canceled")
            raise
    finally:
        dial_out.close(leg)
