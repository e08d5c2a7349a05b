"""Calls the agent places: one entry point for every route, the per-agent limits, and the record of
how each call went.

    call_id = await place_call(runtime, "sip:alice@127.0.0.1:5080", state={"appointment": "Tue 10:00"})
    placed = placed_call(runtime, call_id)
    outcome = await placed.wait(timeout=120)      # "answered", "busy", "no-answer" or "failed"
    placed.answered_by                            # "human", "machine", "unknown" or None (not answered)

Routes, by target: a `sip:` URI is dialled directly over SIP; a phone number goes out through
the SIP trunk when `transports.sip.trunk` is configured, else over Twilio's REST API.

A route is a coroutine `dialer(runtime, placed)` that places the call, runs it to its end and
returns: it reports what happens through the `PlacedCall` (`attach` once the agent's `Call` exists,
`finish` with the outcome). `place_call` holds one of the runtime's sessions for the call from the
start (outbound calls count against the same capacity as inbound ones); `attach` hands it over to the
running call, `finish` frees it when the call never got that far.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from loguru import logger

from processors.answering import Answered, AnsweringGate, Beep
from processors.vad import make_vad_analyzer

from .call_control import PipelineCallControl

if TYPE_CHECKING:
    from .call import Call
    from .runtime import AgentRuntime

Outcome = Literal["answered", "busy", "no-answer", "failed"]
AnsweredBy = Literal["human", "machine", "unknown"]  # unknown: nothing said after the answer
Route = Literal["sip", "trunk", "twilio"]
OUTCOMES: tuple[str, ...] = ("answered", "busy", "no-answer", "failed")

# E.164 with or without '+', or a national number with the usual separators.
PHONE_NUMBER = re.compile(r"^\+?[0-9][0-9 ().-]{2,30}$")
PER_MINUTE_WINDOW = 60.0
KEEP_FINISHED = 200  # ended calls kept for lookups (the HTTP API, tests)
# A machine whose beep we never hear (some have none, some beep outside the band): leave the message
# this long after deciding it is a machine, when its greeting has surely ended.
NO_BEEP_SECS = 12.0
# The longest our detector takes (processors.answering.SILENT_SECS) with room to spare; a route whose
# detection says nothing in this long lets the flow start anyway.
DECISION_WAIT_SECS = 8.0

_ids = itertools.count(1)


class OutboundError(ValueError):
    """The call cannot be placed as asked (a bad target, a route that is not configured)."""


class OutboundRefused(RuntimeError):
    """The call is refused by a limit (outbound max_calls, per_minute, or the agent's capacity)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)
class PlacedCall:
    """One call the agent placed, from dialling to its end."""

    id: str
    to: str
    route: Route
    from_: str | None = None
    state: dict = field(default_factory=dict)
    placed_at: float = field(default_factory=time.monotonic)
    outcome: Outcome | None = None
    answered_by: AnsweredBy | None = None
    detail: str = ""  # the reason behind a failure, the SIP status, Twilio's status
    call: Call | None = None  # the agent's call, once answered
    # (time.monotonic(), kind, data): dialling, ringing, answered, answered_by, ended, ... The agent's
    # call notes the same events in its timeline once it exists.
    events: list[tuple[float, str, dict]] = field(default_factory=list)
    _done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _decided: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _release: Callable[[], None] | None = field(default=None, repr=False)

    def note(self, kind: str, **data) -> None:
        self.events.append((time.monotonic(), kind, data))
        if self.call is not None:
            self.call.note(kind, **data)

    def attach(self, call: Call) -> None:
        """The callee answered and the agent's call exists: the call starts its flow with `state` and
        holds the session itself from now on."""
        self.call = call
        call.placed = self
        call.flow_state.update(self.state)
        self._free_session()
        self.note("answered", call_id=call.stats.call_id)
        if self.outcome is None:
            self.outcome = "answered"

    def classified(self, answered_by: AnsweredBy, **timing) -> None:
        """Who answered, as the detector (ours, or Twilio's) decided; `timing`: seconds it took etc."""
        self.answered_by = answered_by
        self.note("answered_by", answered_by=answered_by, **timing)
        self._decided.set()

    async def person_answered(self, timeout: float = DECISION_WAIT_SECS) -> bool:
        """Whether a person (or someone silent) answered, once that is decided; True when no decision
        comes within `timeout` (a route without detection), False for a machine or an ended call."""
        try:
            await asyncio.wait_for(self._decided.wait(), timeout)
        except TimeoutError:
            return not self.done
        return self.answered_by != "machine" and not self.done

    def finish(self, outcome: Outcome | None = None, detail: str = "") -> None:
        """The call is over. `outcome` counts unless one was recorded before (an answered call that
        later fails stays answered); `detail` is kept when there is none yet."""
        if self._done.is_set():
            return
        if outcome is not None and outcome not in OUTCOMES:
            raise ValueError(f"outcome {outcome!r} is not one of {', '.join(OUTCOMES)}")
        if self.outcome is None:
            self.outcome = outcome or "failed"
        if detail and not self.detail:
            self.detail = detail
        self._free_session()
        self.note("ended", outcome=self.outcome, answered_by=self.answered_by, detail=self.detail)
        self._done.set()
        self._decided.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def wait(self, timeout: float | None = None) -> Outcome | None:
        """The outcome once the call has ended; None when `timeout` passed first."""
        try:
            await asyncio.wait_for(self._done.wait(), timeout)
        except TimeoutError:
            return None
        return self.outcome

    def summary(self) -> dict:
        """The call as the API and the CLI report it."""
        return {
            "id": self.id,
            "to": self.to,
            "from": self.from_,
            "route": self.route,
            "outcome": self.outcome,
            "answered_by": self.answered_by,
            "detail": self.detail,
            "ended": self.done,
            "events": [
                {"at": round(at - self.placed_at, 3), "event": kind, **data} for at, kind, data in self.events
            ],
        }

    def _free_session(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


Dialer = Callable[["AgentRuntime", PlacedCall], Awaitable[None]]


@dataclass
class OutboundBook:
    """The agent's placed calls: running ones, recently ended ones, and when each was placed (for
    per_minute). One per runtime: `outbound_book(runtime)`."""

    running: dict[str, PlacedCall] = field(default_factory=dict)
    ended: deque[PlacedCall] = field(default_factory=lambda: deque(maxlen=KEEP_FINISHED))
    placed_times: deque[float] = field(default_factory=deque)
    tasks: set[asyncio.Task] = field(default_factory=set)

    def find(self, call_id: str) -> PlacedCall | None:
        if call_id in self.running:
            return self.running[call_id]
        return next((placed for placed in self.ended if placed.id == call_id), None)

    def limit_reason(self, max_calls: int, per_minute: int, now: float) -> str | None:
        while self.placed_times and now - self.placed_times[0] >= PER_MINUTE_WINDOW:
            self.placed_times.popleft()
        if len(self.running) >= max_calls:
            return f"outbound limit: {len(self.running)} of outbound.max_calls {max_calls} calls running"
        if len(self.placed_times) >= per_minute:
            return (
                f"outbound limit: {len(self.placed_times)} calls placed in the last minute "
                f"(outbound.per_minute {per_minute})"
            )
        return None


def outbound_book(runtime: AgentRuntime) -> OutboundBook:
    book = runtime.outbound
    if book is None:
        book = runtime.outbound = OutboundBook()
    return book


def placed_call(runtime: AgentRuntime, call_id: str) -> PlacedCall | None:
    """A call the agent placed (running or recently ended), by the id place_call returned."""
    return outbound_book(runtime).find(call_id)


def route_for(runtime: AgentRuntime, to: str) -> Route:
    """Which way a call to `to` goes: 'sip' for a SIP URI, 'trunk' for a number when the agent has a
    SIP trunk, else 'twilio'. Raises OutboundError for anything else."""
    target = to.strip()
    if target.lower().startswith("sips:"):
        raise OutboundError(f"--to {to!r}: sips: needs TLS, and SIP calls go out over UDP; use sip:")
    if target.lower().startswith("sip:"):
        return "sip"
    if not PHONE_NUMBER.match(target):
        raise OutboundError(
            f"--to {to!r} is neither a SIP URI (sip:user@host[:port]) nor a phone number (+15551234567)"
        )
    if runtime.spec.transports.sip.trunk is not None:
        return "trunk"
    return "twilio"


def _dialer(route: Route) -> Dialer:
    if route in ("sip", "trunk"):
        from .lines.sip import sip_outbound

        return sip_outbound
    from .twilio_outbound import twilio_outbound

    return twilio_outbound


async def place_call(
    runtime: AgentRuntime,
    to: str,
    from_: str | None = None,
    state: dict | None = None,
    *,
    dialer: Dialer | None = None,
) -> str:
    """Place a call with the agent on it; returns its id at once, while it rings. The call runs in the
    background to its end (`placed_call(runtime, id).wait()`). Raises OutboundError for a target no
    route can take and OutboundRefused when a limit says no. `dialer` overrides the route's (tests)."""
    route = route_for(runtime, to)
    limits = runtime.spec.outbound
    book = outbound_book(runtime)
    now = time.monotonic()
    # Checked and taken before the first await: two calls at once cannot both have the last slot.
    if (reason := book.limit_reason(limits.max_calls, limits.per_minute, now)) is not None:
        raise OutboundRefused(reason)
    call_id = f"out-{next(_ids)}-{int(time.time() * 1000) % 100_000_000:08d}"
    key = f"outbound-{call_id}"
    if (reason := runtime.reserve(key)) is not None:
        raise OutboundRefused(reason)
    placed = PlacedCall(call_id, to.strip(), route, from_, dict(state or {}))
    placed._release = lambda: runtime.release(key)
    book.running[call_id] = placed
    book.placed_times.append(now)
    placed.note("dialling", to=placed.to, route=route)
    try:
        dial = dialer or _dialer(route)
    except BaseException:
        placed.finish("failed", f"no {route} route")
        _retire(book, placed)
        raise
    task = asyncio.create_task(_run(runtime, dial, placed), name=f"outbound-{call_id}")
    book.tasks.add(task)
    task.add_done_callback(book.tasks.discard)
    logger.info(f"outbound call {call_id} to {placed.to} over {route}")
    return call_id


async def _run(runtime: AgentRuntime, dial: Dialer, placed: PlacedCall) -> None:
    try:
        await dial(runtime, placed)
    except asyncio.CancelledError:
        placed.finish("failed", "cancelled")
        raise
    except OutboundError as exc:  # a setting the route needs: said once, no traceback
        logger.error(f"outbound call {placed.id} to {placed.to} not placed: {exc}")
        placed.finish("failed", str(exc))
    except Exception as exc:
        logger.opt(exception=exc).error(f"outbound call {placed.id} to {placed.to} failed: {exc}")
        placed.finish("failed", f"{type(exc).__name__}: {exc}")
    finally:
        placed.finish()
        _retire(outbound_book(runtime), placed)
        logger.info(
            f"outbound call {placed.id} ended: {placed.outcome} {placed.answered_by or ''} {placed.detail}"
        )


def _retire(book: OutboundBook, placed: PlacedCall) -> None:
    if book.running.pop(placed.id, None) is not None:
        book.ended.append(placed)


def parse_state(pairs: list[str]) -> dict[str, str]:
    """`key=value` items (the CLI's --state) as a dict; raises OutboundError naming a bad one."""
    state: dict[str, str] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OutboundError(f"--state {item!r} is not key=value")
        state[key.strip()] = value
    return state


# Who answered: what the agent does about it --------------------------------------------------------


def answering_screen(runtime: AgentRuntime, placed: PlacedCall) -> AnsweringGate:
    """The gate for a call whose callee speaks first: our own answering-machine detection on the
    callee's audio (with the call's VAD settings), its decision and the beep noted as the call's
    events, and `outbound.on_machine` carried out on a machine."""
    vad_spec = runtime.spec.vad
    vad = make_vad_analyzer(
        vad_spec.analyzer,
        aggressiveness=vad_spec.aggressiveness,
        frame_ms=vad_spec.frame_ms,
        confidence=vad_spec.confidence,
        start_secs=vad_spec.start_secs,
        stop_secs=vad_spec.stop_secs,
        min_volume=vad_spec.min_volume,
    )
    waiting: dict[str, asyncio.Task] = {}

    async def on_event(event: Answered | Beep) -> None:
        if isinstance(event, Answered):
            placed.classified(
                event.by, after_secs=event.at, greeting_secs=event.greeting_secs, reason=event.reason
            )
            if event.by == "machine":
                if runtime.spec.outbound.on_machine == "hang_up":
                    await machine_answered(runtime, placed)
                else:
                    waiting["no_beep"] = asyncio.create_task(_message_without_beep(runtime, placed))
        else:
            placed.note("beep", at=event.at, hz=event.hz, secs=event.secs)
            if placed.answered_by == "machine" and "no_beep" in waiting:
                waiting.pop("no_beep").cancel()
                await machine_answered(runtime, placed)

    return AnsweringGate(vad, on_event, name=f"answering-{placed.id}")


async def _message_without_beep(runtime: AgentRuntime, placed: PlacedCall) -> None:
    if await placed.wait(NO_BEEP_SECS) is None:  # still on, and no beep came
        placed.note("no_beep", waited_secs=NO_BEEP_SECS)
        await machine_answered(runtime, placed)


async def machine_answered(runtime: AgentRuntime, placed: PlacedCall) -> None:
    """A machine answered (after its beep, when leaving a message): hang up, or speak
    `outbound.message` and then hang up, as `outbound.on_machine` says. Twilio's detection calls it too."""
    call = placed.call
    if call is None or placed.done:
        return
    control = PipelineCallControl(call)
    if runtime.spec.outbound.on_machine == "leave_message":
        placed.note("leaving_message", text=runtime.spec.outbound.message)
        await control.say(runtime.spec.outbound.message)
        await control.hang_up(after_current_sentence=True)
    else:
        placed.note("hanging_up_on_machine")
        call.ended_by_agent = True
        call.note("agent_hung_up")
        await call.hang_up()
