"""Scenario files: the conversations `chroma-agent test` plays against an agent, and what to expect.

Keys follow pipecat's evals format (`scenarios:`, `turns:`, `user:`, `expect:`, `event:`,
`within_ms:`) where they overlap, and add DTMF, silences, barge-in, flow checks and latency limits.
Paths are relative to the scenario file. A full example::

    agent: ../agents/demo/agent.yaml     # optional; the CLI may override
    transport: inprocess                 # optional default: inprocess | twilio | sip | webrtc
    runs: 1                              # optional default for every scenario
    scenarios:
      - name: order status
        runs: 5
        script: order_status_script.py:turns   # optional scripted reasoner for the tiny model
        turns:
          - user: "Hi, I'd like to check my order."   # spoken with espeak-ng at run time
            pause_ms: 300                            # silence before this turn starts (default 0)
            expect:
              - event: bot_started_speaking          # time to first agent audio at the wire
                within_ms: 1500
          - audio: caller.wav                        # a WAV file
          - dtmf: "1234#"                            # 0-9 * # A-D, quoted
            expect:
              - event: node_reached                  # during this turn (before the next one starts)
                node: lookup_order
          - silence_ms: 2000                         # the caller says nothing for this long
          - user: "Wait, stop."
            barge_in_after_ms: 800                   # 800 ms after the agent starts speaking
            # or barge_in_at_text: "your order"      # once the agent's text so far contains it
            expect:
              - event: bot_stopped_speaking          # agent audio stops within 300 ms of the barge-in
                within_ms: 300
              - event: kept_text_prefix              # kept text is a prefix of what was being said
        expect:                                      # over the whole conversation
          - event: node_reached
            node: lookup_order
          - event: not_node_reached
            node: transfer
          - event: function_call
            name: lookup_order
            arguments: {order_id: "A17"}             # subset match, nested mappings too
          - event: dtmf_sent
            digits: "1"
          - event: call_ended
            by: agent                                # optional: agent | caller
          - event: call_transferred
            to: "+15551234567"                       # optional
        limits:                                      # over all runs: percentiles in ms
          first_audio_ms: {p50: 800, p95: 1500}
          barge_in_stop_ms: {p95: 300}

Turn-level events: `bot_started_speaking`, `bot_stopped_speaking` and `kept_text_prefix` (the last
two need a barge-in turn), and `function_call`, `node_reached`, `dtmf_sent`. Conversation-level:
`node_reached`, `not_node_reached`, `function_call`, `dtmf_sent`, `call_ended`, `call_transferred`.
`within_ms` on a turn-level event counts from the end of the turn's caller input (see
`events.turn_anchor`), or from the barge-in for `bot_stopped_speaking`; on a conversation-level
event it counts from the start of the conversation.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.problems import FlowFileError, Lines, Loc, Problem, dotted, read_mapping, show

TRANSPORTS = ("inprocess", "twilio", "sip", "webrtc")
LIMIT_KEYS = ("first_audio_ms", "barge_in_stop_ms")
PERCENTILES = ("p50", "p95")
DTMF = re.compile(r"[0-9*#A-D]+")


@dataclass(frozen=True)
class _EventRule:
    turn: bool  # allowed in a turn's expect
    conversation: bool  # allowed in a scenario's expect
    params: dict[str, str]  # key -> kind of value: "string", "dtmf", "mapping", "by"
    required: tuple[str, ...] = ()
    within: bool = True  # takes within_ms
    barge_in: bool = False  # only on a turn that barges in


EVENTS: dict[str, _EventRule] = {
    "bot_started_speaking": _EventRule(turn=True, conversation=False, params={}),
    "bot_stopped_speaking": _EventRule(turn=True, conversation=False, params={}, barge_in=True),
    "kept_text_prefix": _EventRule(turn=True, conversation=False, params={}, within=False, barge_in=True),
    "function_call": _EventRule(
        turn=True, conversation=True, params={"name": "string", "arguments": "mapping"}, required=("name",)
    ),
    "node_reached": _EventRule(turn=True, conversation=True, params={"node": "string"}, required=("node",)),
    "dtmf_sent": _EventRule(turn=True, conversation=True, params={"digits": "dtmf"}),
    "call_ended": _EventRule(turn=False, conversation=True, params={"by": "by"}),
    "call_transferred": _EventRule(turn=False, conversation=True, params={"to": "string"}),
    "not_node_reached": _EventRule(
        turn=False, conversation=True, params={"node": "string"}, required=("node",), within=False
    ),
}

_FILE_KEYS = ("agent", "transport", "runs", "scenarios")
_SCENARIO_KEYS = ("name", "runs", "script", "turns", "expect", "limits")
_TURN_KINDS = {"user": "user", "audio": "audio", "dtmf": "dtmf", "silence_ms": "silence"}
_TURN_KEYS = (*_TURN_KINDS, "pause_ms", "barge_in_after_ms", "barge_in_at_text", "expect")


class ScenarioFileError(FlowFileError):
    """A bad scenario file; str() is every problem, one per line: `file:line: field: message`."""


@dataclass
class Expectation:
    event: str  # one of EVENTS
    params: dict[str, Any]  # the event's own keys: name, arguments, node, digits, by, to
    within_ms: float | None = None
    line: int = 0


@dataclass
class Turn:
    kind: str  # "user" | "audio" | "dtmf" | "silence"
    text: str | None = None  # kind "user": spoken with espeak-ng at run time
    wav: Path | None = None  # kind "audio": absolute
    digits: str | None = None  # kind "dtmf"
    silence_ms: float | None = None  # kind "silence"
    pause_ms: float = 0.0  # silence before the turn starts
    barge_in_after_ms: float | None = None  # start this long after the agent starts speaking
    barge_in_at_text: str | None = None  # start once the agent's text so far contains this
    expect: list[Expectation] = field(default_factory=list)
    line: int = 0

    @property
    def barges_in(self) -> bool:
        return self.barge_in_after_ms is not None or self.barge_in_at_text is not None


@dataclass
class Scenario:
    name: str
    runs: int
    turns: list[Turn]
    expect: list[Expectation] = field(default_factory=list)
    limits: dict[str, dict[str, float]] = field(default_factory=dict)  # {"first_audio_ms": {"p95": 1500}}
    script: tuple[Path, str] | None = None  # (module file, attribute) of a scripted reasoner
    line: int = 0
    limit_lines: dict[str, int] = field(default_factory=dict)  # "first_audio_ms.p95" -> line


@dataclass
class ScenarioFile:
    path: Path
    agent: Path | None
    transport: str | None
    scenarios: list[Scenario]


def load_scenarios(path: str | Path) -> ScenarioFile:
    """Read and check a scenario file; raises ScenarioFileError naming every problem."""
    path = Path(path)
    root, data = read_mapping(path, ScenarioFileError, "a mapping with a scenarios list")
    lines = Lines(root)
    checker = _Checker(path.resolve().parent, lines)
    loaded = checker.file(path, data)
    problems = lines.duplicates + [(lines.of(loc), dotted(loc), message) for loc, message in checker.problems]
    if problems:
        raise ScenarioFileError(path, problems)
    return loaded


def find_scenario_files(paths: list[str | Path]) -> list[Path]:
    """Files as given; folders searched (recursively, sorted) for `*.yaml` / `*.yml` files that have a
    top-level `scenarios:` key, so that agent and flow files kept beside them are passed over."""
    found: list[Path] = []
    for given in map(Path, paths):
        if given.is_dir():
            candidates = sorted(p for p in given.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
            found += [p for p in candidates if _has_scenarios(p)]
        else:
            found.append(given)  # a missing file is reported by load_scenarios
    return list(dict.fromkeys(found))


def _has_scenarios(path: Path) -> bool:
    try:
        return re.search(r"^scenarios\s*:", path.read_text(encoding="utf-8"), re.MULTILINE) is not None
    except (OSError, UnicodeDecodeError):
        return True  # let load_scenarios say why it cannot be read


def unknown_key(key: Any, known: tuple[str, ...] | list[str], where: str = "") -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    if close:
        return f"unknown key{where}; did you mean {close[0]!r}?"
    return f"unknown key{where}; expected one of {', '.join(known)}"


class _Checker:
    """Checks every part on its own, so one bad part does not hide the problems in the others."""

    def __init__(self, base: Path, lines: Lines):
        self.base, self.lines = base, lines
        self.problems: list[Problem] = []

    def problem(self, loc: Loc, message: str) -> None:
        self.problems.append((loc, message))

    def bad(self, loc: Loc, value: Any, expected: str) -> None:
        self.problem(loc, f"{show(value)} is not allowed; expected {expected}")

    # values

    def ms(self, loc: Loc, value: Any) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or value != value:
            self.bad(loc, value, "a number of milliseconds >= 0")
            return None
        return float(value)

    def runs(self, loc: Loc, value: Any) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.bad(loc, value, "a whole number of runs >= 1")
            return None
        return value

    def text(self, loc: Loc, value: Any, what: str = "a non-empty string") -> str | None:
        if not isinstance(value, str) or not value.strip():
            self.bad(loc, value, what)
            return None
        return value

    def digits(self, loc: Loc, value: Any) -> str | None:
        if not isinstance(value, str) or not DTMF.fullmatch(value):
            self.bad(loc, value, "a quoted string of DTMF keys: 0-9, *, #, A-D")
            return None
        return value

    def file_path(self, loc: Loc, value: Any, what: str) -> Path | None:
        if not isinstance(value, str) or not value.strip():
            self.bad(loc, value, f"the path of {what}, relative to this file")
            return None
        resolved = (self.base / value).resolve()
        if not resolved.is_file():
            self.problem(loc, f"{value!r} not found (looked for {resolved}); expected {what}")
            return None
        return resolved

    def mapping(self, loc: Loc, value: Any, what: str) -> dict | None:
        if not isinstance(value, dict):
            self.bad(loc, value, what)
            return None
        return value

    def items(self, loc: Loc, value: Any, what: str) -> list:
        if not isinstance(value, list):
            self.bad(loc, value, what)
            return []
        return value

    def keys(self, loc: Loc, data: dict, known: tuple[str, ...], where: str = "") -> None:
        for key in data:
            if key not in known:
                self.problem((*loc, key), unknown_key(key, known, where))

    # sections

    def file(self, path: Path, data: dict) -> ScenarioFile:
        self.keys((), data, _FILE_KEYS)
        agent = self.file_path(("agent",), data["agent"], "an agent file") if "agent" in data else None
        transport = data.get("transport")
        if transport is not None and transport not in TRANSPORTS:
            self.bad(("transport",), transport, f"one of {', '.join(TRANSPORTS)}")
            transport = None
        runs = self.runs(("runs",), data["runs"]) if "runs" in data else 1
        if "scenarios" not in data:
            self.problem(("scenarios",), "missing; expected a list of scenarios")
        entries = self.items(("scenarios",), data.get("scenarios", []), "a list of scenarios")
        if "scenarios" in data and isinstance(data["scenarios"], list) and not entries:
            self.problem(("scenarios",), "empty; expected at least one scenario")
        scenarios, names = [], {}
        for i, entry in enumerate(entries):
            name = entry.get("name") if isinstance(entry, dict) else None
            if isinstance(name, str) and name in names:
                self.problem(
                    ("scenarios", i, "name"),
                    f"{name!r} is not allowed; expected a name not used before "
                    f"(scenarios[{names[name]}] has it)",
                )
            elif isinstance(name, str):
                names[name] = i
            scenario = self.scenario(("scenarios", i), entry, runs or 1)
            if scenario is not None:
                scenarios.append(scenario)
        return ScenarioFile(path=path, agent=agent, transport=transport, scenarios=scenarios)

    def scenario(self, loc: Loc, data: Any, default_runs: int) -> Scenario | None:
        if self.mapping(loc, data, "a mapping with name and turns") is None:
            return None
        self.keys(loc, data, _SCENARIO_KEYS)
        name = self.text((*loc, "name"), data["name"]) if "name" in data else None
        if "name" not in data:
            self.problem((*loc, "name"), "missing; expected the scenario's name")
        runs = self.runs((*loc, "runs"), data["runs"]) if "runs" in data else default_runs
        script = self.script((*loc, "script"), data["script"]) if "script" in data else None
        if "turns" not in data:
            self.problem((*loc, "turns"), "missing; expected a list of turns")
        entries = self.items((*loc, "turns"), data.get("turns", []), "a list of turns")
        if "turns" in data and isinstance(data["turns"], list) and not entries:
            self.problem((*loc, "turns"), "empty; expected at least one turn")
        turns = [self.turn((*loc, "turns", i), entry) for i, entry in enumerate(entries)]
        expect = self.expectations((*loc, "expect"), data.get("expect", []), turn=None)
        limits, limit_lines = self.limits((*loc, "limits"), data.get("limits", {}))
        if name is None or runs is None or None in turns:
            return None
        return Scenario(
            name=name,
            runs=runs,
            turns=turns,
            expect=expect,
            limits=limits,
            script=script,
            line=self.lines.of(loc),
            limit_lines=limit_lines,
        )

    def script(self, loc: Loc, value: Any) -> tuple[Path, str] | None:
        module, _, attribute = value.rpartition(":") if isinstance(value, str) else ("", "", "")
        if not module or not attribute.isidentifier():
            self.bad(loc, value, '"file.py:attribute", a Python file relative to this file and a name in it')
            return None
        resolved = (self.base / module).resolve()
        if not resolved.is_file():
            self.problem(loc, f"{module!r} not found (looked for {resolved}); expected a Python file")
            return None
        return resolved, attribute

    def turn(self, loc: Loc, data: Any) -> Turn | None:
        if self.mapping(loc, data, "a mapping with one of user, audio, dtmf, silence_ms") is None:
            return None
        self.keys(loc, data, _TURN_KEYS)
        given = [key for key in _TURN_KINDS if key in data]
        if len(given) != 1:
            found = "none" if not given else " and ".join(given)
            self.problem(loc, f"has {found}; expected exactly one of user, audio, dtmf, silence_ms")
            return None
        key = given[0]
        turn = Turn(kind=_TURN_KINDS[key], line=self.lines.of(loc))
        ok = True
        if key == "user":
            turn.text = self.text((*loc, key), data[key], "the caller's words, a non-empty string")
            ok = turn.text is not None
        elif key == "audio":
            turn.wav = self.wav((*loc, key), data[key])
            ok = turn.wav is not None
        elif key == "dtmf":
            turn.digits = self.digits((*loc, key), data[key])
            ok = turn.digits is not None
        else:
            turn.silence_ms = self.ms((*loc, key), data[key])
            ok = turn.silence_ms is not None
        if "pause_ms" in data:
            pause = self.ms((*loc, "pause_ms"), data["pause_ms"])
            turn.pause_ms, ok = (pause, ok) if pause is not None else (0.0, False)
        barge_keys = [k for k in ("barge_in_after_ms", "barge_in_at_text") if k in data]
        if len(barge_keys) == 2:
            self.problem(
                (*loc, "barge_in_at_text"), "not allowed with barge_in_after_ms; expected one of the two"
            )
            ok = False
        for barge in barge_keys:
            if key not in ("user", "audio"):
                self.problem(
                    (*loc, barge), f"not allowed on a {key} turn; expected only on a user or audio turn"
                )
                ok = False
        if "barge_in_after_ms" in data:
            turn.barge_in_after_ms = self.ms((*loc, "barge_in_after_ms"), data["barge_in_after_ms"])
            ok = ok and turn.barge_in_after_ms is not None
        if "barge_in_at_text" in data:
            turn.barge_in_at_text = self.text((*loc, "barge_in_at_text"), data["barge_in_at_text"])
            ok = ok and turn.barge_in_at_text is not None
        turn.expect = self.expectations(
            (*loc, "expect"), data.get("expect", []), turn=turn, barges_in=bool(barge_keys)
        )
        return turn if ok else None

    def wav(self, loc: Loc, value: Any) -> Path | None:
        resolved = self.file_path(loc, value, "a WAV file")
        if resolved is None:
            return None
        with open(resolved, "rb") as f:
            header = f.read(12)
        if header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            self.problem(loc, f"{value!r} is not a WAV file (no RIFF/WAVE header); expected a WAV file")
            return None
        return resolved

    def expectations(
        self, loc: Loc, value: Any, turn: Turn | None, barges_in: bool = False
    ) -> list[Expectation]:
        entries = self.items(loc, value, "a list of expectations, each a mapping with event")
        out = [self.expectation((*loc, i), entry, turn, barges_in) for i, entry in enumerate(entries)]
        return [e for e in out if e is not None]

    def expectation(self, loc: Loc, data: Any, turn: Turn | None, barges_in: bool) -> Expectation | None:
        if self.mapping(loc, data, "a mapping with event") is None:
            return None
        allowed = [
            name for name, rule in EVENTS.items() if (rule.turn if turn is not None else rule.conversation)
        ]
        if "event" not in data:
            self.problem((*loc, "event"), f"missing; expected one of {', '.join(allowed)}")
            return None
        event = data["event"]
        rule = EVENTS.get(event) if isinstance(event, str) else None
        if rule is None or event not in allowed:
            where = "a turn's expect" if turn is not None else "a scenario's expect"
            hint = ""
            if rule is not None:
                hint = f" ({event} goes in {'a turn' if rule.turn else 'the scenario'}'s expect)"
            else:
                close = difflib.get_close_matches(str(event), allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
            self.problem(
                (*loc, "event"),
                f"{show(event)} is not allowed in {where}; expected one of {', '.join(allowed)}{hint}",
            )
            return None
        known = ("event", *(("within_ms",) if rule.within else ()), *rule.params)
        self.keys(loc, data, known, f" for {event}")
        ok = True
        for key in rule.required:
            if key not in data:
                self.problem((*loc, key), f"missing; {event} needs {key}")
                ok = False
        params: dict[str, Any] = {}
        for key, kind in rule.params.items():
            if key not in data:
                continue
            where = (*loc, key)
            if kind == "string":
                checked = self.text(where, data[key])
            elif kind == "dtmf":
                checked = self.digits(where, data[key])
            elif kind == "mapping":
                checked = self.mapping(where, data[key], "a mapping of argument names to values")
            else:  # "by"
                checked = data[key] if data[key] in ("agent", "caller") else None
                if checked is None:
                    self.bad(where, data[key], "agent or caller")
            ok = ok and checked is not None
            params[key] = checked
        within = None
        if rule.within and "within_ms" in data:
            within = self.ms((*loc, "within_ms"), data["within_ms"])
            ok = ok and within is not None
        if rule.barge_in and turn is not None and not barges_in:
            self.problem(
                (*loc, "event"),
                f"{event} needs a barge-in turn; expected barge_in_after_ms or barge_in_at_text on this turn",
            )
            ok = False
        return (
            Expectation(event=event, params=params, within_ms=within, line=self.lines.of(loc)) if ok else None
        )

    def limits(self, loc: Loc, value: Any) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
        data = self.mapping(loc, value, f"a mapping of {' / '.join(LIMIT_KEYS)} to percentiles")
        limits: dict[str, dict[str, float]] = {}
        lines: dict[str, int] = {}
        for key, entry in (data or {}).items():
            if key not in LIMIT_KEYS:
                self.problem((*loc, key), unknown_key(key, LIMIT_KEYS))
                continue
            percentiles = self.mapping((*loc, key), entry, "a mapping like {p50: 800, p95: 1500}")
            if percentiles is None:
                continue
            if not percentiles:
                self.problem((*loc, key), "empty; expected p50 and/or p95")
            for pct, limit in percentiles.items():
                if pct not in PERCENTILES:
                    self.problem((*loc, key, pct), unknown_key(pct, PERCENTILES))
                    continue
                checked = self.ms((*loc, key, pct), limit)
                if checked is not None:
                    limits.setdefault(key, {})[pct] = checked
                    lines[f"{key}.{pct}"] = self.lines.of((*loc, key, pct))
        return limits, lines
