"""What one run of a scenario recorded: timed events, the checks evaluated over them, and the result.

Times are ms since the conversation started, on the caller's clock: what the caller's side of the
wire saw, so latencies include the transport. Every event the runner attributes to scenario turn
`i` has `turn=i` (0-based); agent-side events (`agent_*`, `tool_call`, `node`, `dtmf_sent`) carry
the index of the most recent caller turn. A `silence_ms` turn is marked by a `caller_speech_start`
and a `caller_speech_end` with `data={"silence": True}` at the start and end of the silence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

EVENT_KINDS = {
    "caller_speech_start",  # data: {"text": str} or {"wav": str}; {"silence": True} for a silence turn
    "caller_speech_end",
    "caller_dtmf",  # data: {"digits": str}; at the last key's press
    "caller_wait",  # a turn with no caller input started: the caller waits for the agent (its greeting)
    "agent_audio_start",  # first non-silent agent audio of one agent reply, at the wire
    "agent_audio_end",  # last non-silent agent audio of that reply
    "vad_start",  # the agent side's VAD, when the transport can observe it
    "vad_stop",
    "barge_in",  # the caller started speaking while the agent was speaking
    "agent_stopped",  # agent audio stopped at the wire after a barge-in
    "tool_call",  # data: {"name": str, "arguments": dict}
    "node",  # data: {"name": str}: flow node entered
    "dtmf_sent",  # data: {"digits": str}: the agent sent DTMF
    # data: {"text": str, "interrupted": bool, "sent_text": str}: after a barge-in, "text" is what was kept
    # and "sent_text" what the agent had generated of that reply when it was cut
    "agent_text",
    "call_ended",  # data: {"by": "agent" | "caller"}
    "transferred",  # data: {"to": str}
    "error",  # data: {"message": str}
}


@dataclass
class Event:
    t_ms: float  # ms since the conversation started, on the caller's clock
    kind: str  # one of EVENT_KINDS
    turn: int | None = None  # index of the scenario turn it belongs to (0-based)
    data: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"t_ms": self.t_ms, "kind": self.kind, "turn": self.turn, "data": dict(self.data)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Event:
        return cls(float(d["t_ms"]), d["kind"], d.get("turn"), dict(d.get("data") or {}))


@dataclass
class Check:
    """One evaluated expectation. A skipped check could not be decided (no judge could be reached, or
    the agent has no such event): it did not pass, and `detail` says why it was skipped."""

    name: str  # short, e.g. "turn 2: bot_started_speaking within 800 ms"
    passed: bool
    detail: str  # what was measured or missing, in words
    turn: int | None = None  # 0-based index of the scenario turn
    value_ms: float | None = None
    line: int | None = None  # the scenario file line of the expectation
    skipped: bool = False

    @property
    def failed(self) -> bool:
        return not self.passed and not self.skipped

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Check:
        return cls(
            d["name"],
            bool(d["passed"]),
            d.get("detail", ""),
            d.get("turn"),
            d.get("value_ms"),
            d.get("line"),
            bool(d.get("skipped", False)),
        )


def skipped(name: str, reason: str, *, turn: int | None = None, line: int | None = None) -> Check:
    return Check(name, False, reason, turn=turn, line=line, skipped=True)


@dataclass
class RunResult:
    """One run of one scenario."""

    scenario: str
    file: str
    transport: str  # "inprocess" | "twilio" | "sip" | "webrtc"
    run: int  # 1-based
    events: list[Event]
    checks: list[Check] = field(default_factory=list)
    error: str | None = None  # the run could not complete (exception text); a run with an error fails
    duration_ms: float = 0.0

    @property
    def status(self) -> str:
        """"fail" (an error, or a check failed), "skip" (none failed, some could not be decided), "pass"."""
        if self.error is not None or any(check.failed for check in self.checks):
            return "fail"
        return "skip" if any(check.skipped for check in self.checks) else "pass"

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def measurements(self) -> dict[str, list[float]]:
        """`first_audio_ms`: per turn that got agent audio, ms from the turn's anchor (see
        `turn_anchor`) to the turn's next `agent_audio_start`; `barge_in_stop_ms`: per barge-in,
        ms from `barge_in` to the following `agent_stopped`."""
        first_audio = []
        for turn in sorted({e.turn for e in self.events if e.turn is not None}):
            anchor = turn_anchor(self.events, turn)
            audio = first_audio_after(self.events, turn, anchor) if anchor is not None else None
            if audio is not None:
                first_audio.append(audio.t_ms - anchor)
        stops = []
        for barge_in in (e for e in self.events if e.kind == "barge_in"):
            stopped = stopped_after(self.events, barge_in.t_ms)
            if stopped is not None:
                stops.append(stopped.t_ms - barge_in.t_ms)
        return {"first_audio_ms": first_audio, "barge_in_stop_ms": stops}

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "file": self.file,
            "transport": self.transport,
            "run": self.run,
            "passed": self.passed,  # derived; ignored by from_dict
            "status": self.status,  # derived; ignored by from_dict
            "error": self.error,
            "duration_ms": self.duration_ms,
            "measurements": self.measurements(),  # derived; ignored by from_dict
            "checks": [c.to_dict() for c in self.checks],
            "events": [e.to_dict() for e in self.events],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        return cls(
            scenario=d["scenario"],
            file=d["file"],
            transport=d["transport"],
            run=int(d["run"]),
            events=[Event.from_dict(e) for e in d.get("events", [])],
            checks=[Check.from_dict(c) for c in d.get("checks", [])],
            error=d.get("error"),
            duration_ms=float(d.get("duration_ms") or 0.0),
        )


def turn_anchor(events: list[Event], turn: int) -> float | None:
    """When the agent may start answering turn `turn`: the end of the caller's speech, else the
    caller's DTMF, else the start of a silence turn or of a turn without input; None when the turn
    has no caller event."""
    mine = [e for e in events if e.turn == turn]
    for kind, silence in (("caller_speech_end", False), ("caller_dtmf", False)):
        times = [e.t_ms for e in mine if e.kind == kind and bool(e.data.get("silence")) == silence]
        if times:
            return max(times)  # DTMF may come one event per digit: the last one ends the input
    starts = [
        e.t_ms
        for e in mine
        if (e.kind == "caller_speech_start" and e.data.get("silence")) or e.kind == "caller_wait"
    ]
    return min(starts) if starts else None


def first_audio_after(events: list[Event], turn: int, anchor: float) -> Event | None:
    """The first agent audio of turn `turn` that started at or after `anchor`."""
    return next(
        (
            e
            for e in _by_time(events)
            if e.kind == "agent_audio_start" and e.turn == turn and e.t_ms >= anchor
        ),
        None,
    )


def stopped_after(events: list[Event], t_ms: float) -> Event | None:
    """The first `agent_stopped` at or after `t_ms`, unless another barge-in comes first."""
    for e in _by_time(events):
        if e.t_ms < t_ms:
            continue
        if e.kind == "agent_stopped":
            return e
        if e.kind == "barge_in" and e.t_ms > t_ms:
            return None
    return None


def _by_time(events: list[Event]) -> list[Event]:
    return sorted(events, key=lambda e: e.t_ms)  # stable: same-time events keep their recorded order
