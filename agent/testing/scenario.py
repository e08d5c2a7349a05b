"""Scenario files: the conversations `chroma-agent test` plays against an agent, and what to expect.

A scenario file is a pipecat evals scripted-scenario file (`pipecat.evals.scenario`): pipecat's
`name:`, `scenarios:` (with file-level defaults, or the older single scenario at the top), `turns:`
with `user:` / `dtmf:` / `audio:` / `send_after:` or no input at all (a turn that waits for the
agent, e.g. its greeting), `expect:` with pipecat's events and checks (`text_contains`,
`text_excludes`, `calls:` / `name:` / `args:`, `eval:`, `absent:`), `judge:`, `user:`, `context:`,
`stop_on_failure:`, and `!include`. Our additions sit beside them: `agent:`, `transport:`, `runs:`,
`script:`, `limits:`, `pause_ms:` / `silence_ms:` turns, barge-in timing, and flow, DTMF, hang-up and
transfer checks. Paths are relative to the scenario file. A full example::

    name: orders                         # pipecat's file name (optional here)
    agent: ../agents/demo/agent.yaml     # optional; the CLI may override
    transport: inprocess                 # optional default: inprocess | twilio | sip | webrtc
    runs: 1                              # optional default for every scenario
    judge:                               # pipecat's judge block: who answers `eval:` checks
      eval: {service: ollama, model: gemma4:12b}
    scenarios:
      - name: order status
        runs: 5
        script: order_status_script.py:turns   # optional scripted reasoner for the tiny model
        turns:
          - expect:                                  # no caller input: wait for the greeting
              - event: response
                text_contains: "Northwind"
          - user: "Hi, I'd like to check my order."   # spoken with espeak-ng at run time
            pause_ms: 300                            # silence before this turn starts (default 0)
            expect:
              - event: bot_started_speaking          # time to first agent audio at the wire
                within_ms: 1500
              - event: response
                eval: "asks for the order number"    # put to the judge
          - audio: caller.wav                        # WAV, FLAC, OGG, MP3 (pipecat: `user:` gives its words)
          - dtmf: "1234#"                            # 0-9 * # A-D
            expect:
              - event: function_call
                calls:
                  - name: lookup_order
                    args: {order_id: "1234"}         # subset match, nested mappings too
              - event: node_reached                  # during this turn (before the next one starts)
                node: lookup_order
          - silence_ms: 2000                         # the caller says nothing for this long
          - user: "Wait, stop."
            barge_in_after_ms: 800                   # 800 ms after the agent starts speaking
            # or send_after: {event: bot_started_speaking, delay_ms: 800}   (pipecat's spelling)
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
            arguments: {order_id: "A17"}
          - event: dtmf_sent
            digits: "1"
          - event: call_ended
            by: agent                                # optional: agent | caller
          - event: call_transferred
            to: "+15551234567"                       # optional
        limits:                                      # over all runs: percentiles in ms
          first_audio_ms: {p50: 800, p95: 1500}
          barge_in_stop_ms: {p95: 300}

Turn-level events: ours, `bot_started_speaking` (time to first audio), `kept_text_prefix` (needs a
barge-in turn), `node_reached`, `dtmf_sent`; pipecat's, `response` / `llm_response` /
`tts_response` (all three: the text the agent spoke, which for Chroma is the model's own text stream,
cut to what the caller heard after a barge-in), `user_transcription`, `user_started_speaking` /
`user_stopped_speaking` and their `vad_` twins (the agent's VAD), `llm_started` (the agent's first
audio or tool call of the turn), `bot_stopped_speaking`, `bot_interrupted`, `function_call`.
pipecat's `function_call_stopped`, `llm_marker`, `image` and the backchannel events describe things
a speech-to-speech agent does not do: their checks are reported as skipped, with that reason.
Conversation-level: `node_reached`, `not_node_reached`, `function_call`, `dtmf_sent`, `call_ended`,
`call_transferred`.

Where pipecat's format and ours meet on a key, ours keeps its meaning:

- `within_ms` counts from the end of the turn's caller input (see `events.turn_anchor`; for a turn
  with no input, from the turn's start), or from the barge-in for `bot_stopped_speaking` on a
  barge-in turn. pipecat counts from the turn's send, which for its text turns is the same moment.
- `bot_stopped_speaking` on a barge-in turn is how fast the agent stopped; on any other turn it is
  the end of the agent's audio, as in pipecat.
- A turn's expectations are each looked for over the whole turn, in any order (pipecat's
  `check_from: turn_start` for all of them; `check_from` is accepted).
- `function_call` takes ours (`name:` + `arguments:`) and pipecat's (`name:` + `args:`, or
  `calls:`); arguments match as a subset, nested mappings too.
- `audio:` alone is a WAV the caller plays (ours); with `user:` beside it (pipecat's shape),
  `user:` is what the recording says.
- `user:` as a list of text and `pause_ms:` items (pipecat) is one stretch of speech with pauses;
  `pause_ms:` on the turn itself (ours) is silence before the turn.
- `send_after: {event: bot_started_speaking | llm_started | response, delay_ms: N}` is a barge-in
  `barge_in_after_ms: N`; `send_after: {delay_ms: N}` waits N ms once the agent is quiet.
- The caller always speaks (espeak-ng, or the turn's WAV): `user.modality` and `user.speech` are
  checked but the speech is ours. `user_transcription` is the agent's end of the caller's turn
  (its VAD) carrying the caller's scripted words (a speech-to-speech agent writes no transcript),
  or `DTMF: <keys>` for a keyed turn, as pipecat writes it.
- `judge:` is pipecat's block and its judge (`pipecat.evals.judge.EvalJudge`) answers each `eval:`;
  `judge.modality` makes no difference here (the text judged is what the agent spoke either way).
  Where the judge cannot be reached (no key, no network), each `eval:` check is reported skipped
  with the reason.
- `context:` may hold system messages only: they replace the agent's system prompt for the run.
- `stop_on_failure` is accepted; every turn is always played, and every check reported.
- Scenario names are the scenario's own `name:` (pipecat prefixes the file's name).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flows.problems import FlowFileError, Lines, Loc, Problem, dotted, show

# The *-outbound lines turn a scenario round: the agent places the call and the turns are the callee's.
TRANSPORTS = ("inprocess", "twilio", "sip", "webrtc", "sip-outbound", "twilio-outbound")
LIMIT_KEYS = ("first_audio_ms", "barge_in_stop_ms")
PERCENTILES = ("p50", "p95")
DTMF = re.compile(r"[0-9*#A-D]+")

# pipecat's reply events: for Chroma all three are the text the agent spoke
REPLY_EVENTS = ("response", "llm_response", "tts_response")
# pipecat events a speech-to-speech agent has no counterpart for: reported as skipped, with why
UNSUPPORTED_EVENTS = {
    "function_call_stopped": "the agent reports when a tool call starts, not how it ended",
    "llm_marker": "a speech-to-speech model writes no turn-completion markers",
    "image": "the agent outputs no images",
    "bot_backchannel": "the agent has no backchannel events",
    "user_backchannel": "the agent has no backchannel events",
}
# send_after events that mean "once the agent has started its reply": a barge-in
BARGE_IN_ANCHORS = ("bot_started_speaking", "llm_started", *REPLY_EVENTS)


@dataclass(frozen=True)
class _EventRule:
    turn: bool  # allowed in a turn's expect
    conversation: bool  # allowed in a scenario's expect
    params: dict[str, str]  # key -> kind of value: "string", "dtmf", "mapping", "by", "text", "calls"
    required: tuple[str, ...] = ()
    within: bool = True  # takes within_ms
    barge_in: bool = False  # only on a turn that barges in
    absent: bool = False  # takes pipecat's `absent: true`


_TEXT = {"text_contains": "text", "text_excludes": "text"}
_CALL = {"name": "string", "arguments": "mapping", "args": "mapping", "calls": "calls", "eval": "text"}

EVENTS: dict[str, _EventRule] = {
    "bot_started_speaking": _EventRule(turn=True, conversation=False, params={}, absent=True),
    "bot_stopped_speaking": _EventRule(turn=True, conversation=False, params={}, absent=True),
    "kept_text_prefix": _EventRule(turn=True, conversation=False, params={}, within=False, barge_in=True),
    "function_call": _EventRule(turn=True, conversation=True, params=_CALL, absent=True),
    "node_reached": _EventRule(turn=True, conversation=True, params={"node": "string"}, required=("node",)),
    "dtmf_sent": _EventRule(turn=True, conversation=True, params={"digits": "dtmf"}),
    "call_ended": _EventRule(turn=False, conversation=True, params={"by": "by"}),
    "call_transferred": _EventRule(turn=False, conversation=True, params={"to": "string"}),
    "not_node_reached": _EventRule(
        turn=False, conversation=True, params={"node": "string"}, required=("node",), within=False
    ),
    **{
        name: _EventRule(turn=True, conversation=False, params={**_TEXT, "eval": "text"}, absent=True)
        for name in (*REPLY_EVENTS, "user_transcription")
    },
    **{
        name: _EventRule(turn=True, conversation=False, params={}, absent=True)
        for name in (
            "user_started_speaking",
            "user_stopped_speaking",
            "vad_user_started_speaking",
            "vad_user_stopped_speaking",
            "llm_started",
            "bot_interrupted",
        )
    },
    **{
        name: _EventRule(
            turn=True,
            conversation=False,
            params={
                **_TEXT,
                **_CALL,
                "marker": "any",
                "marker_first": "any",
                "markers": "any",
                "text_after": "any",
            },
            absent=True,
        )
        for name in UNSUPPORTED_EVENTS
    },
}

# pipecat's scenario keys that may also sit at the top of a file as every scenario's default
_SCENARIO_KEYS = (
    "name",
    "runs",
    "script",
    "turns",
    "expect",
    "limits",
    "judge",
    "user",
    "context",
    "stop_on_failure",
    "trigger_disconnect",
)
_DEFAULT_KEYS = tuple(k for k in _SCENARIO_KEYS if k != "name")
_FILE_KEYS = ("name", "agent", "transport", "scenarios", *_DEFAULT_KEYS)
_TURN_KINDS = {"user": "user", "audio": "audio", "dtmf": "dtmf", "silence_ms": "silence"}
_TURN_KEYS = (*_TURN_KINDS, "pause_ms", "barge_in_after_ms", "barge_in_at_text", "send_after", "expect")
_EXPECT_COMMON = ("event", "check_from")


class ScenarioFileError(FlowFileError):
    """A bad scenario file; str() is every problem, one per line: `file:line: field: message`."""


@dataclass
class Expectation:
    event: str  # one of EVENTS
    # the event's own keys: name, arguments (pipecat's args), calls, node, digits, by, to,
    # text_contains, text_excludes, eval
    params: dict[str, Any]
    within_ms: float | None = None
    line: int = 0
    absent: bool = False  # pipecat's `absent: true`: no such event in the turn

    @property
    def calls(self) -> list[tuple[str | None, dict | None]]:
        """A function_call's calls, each (name, arguments); None matches any."""
        return self.params.get("calls") or [(self.params.get("name"), self.params.get("arguments"))]


@dataclass
class Turn:
    kind: str  # "user" | "audio" | "dtmf" | "silence" | "wait" (no caller input: the agent speaks)
    text: str | None = None  # kind "user" (spoken with espeak-ng at run time), or what an audio turn says
    wav: Path | None = None  # kind "audio": absolute; any format processors.audio_io reads
    digits: str | None = None  # kind "dtmf"
    silence_ms: float | None = None  # kind "silence"
    pause_ms: float = 0.0  # silence before the turn starts
    barge_in_after_ms: float | None = None  # start this long after the agent starts speaking
    barge_in_at_text: str | None = None  # start once the agent's text so far contains this
    expect: list[Expectation] = field(default_factory=list)
    line: int = 0
    parts: list[str | float] | None = None  # kind "user" with pauses: text, or ms of silence

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
    judge: dict | None = None  # pipecat's `judge.eval` block, as pipecat parsed it
    system_prompt: str | None = None  # from `context:`: replaces the agent's for the run


@dataclass
class ScenarioFile:
    path: Path
    agent: Path | None
    transport: str | None
    scenarios: list[Scenario]
    name: str | None = None  # pipecat's file `name:`


def load_scenarios(path: str | Path) -> ScenarioFile:
    """Read and check a scenario file; raises ScenarioFileError naming every problem."""
    path = Path(path)
    root, data = _read(path)
    lines = Lines(root)
    checker = _Checker(path.resolve().parent, lines, path)
    loaded = checker.file(path, data)
    problems = lines.duplicates + [(lines.of(loc), dotted(loc), message) for loc, message in checker.problems]
    if problems:
        raise ScenarioFileError(path, problems)
    return loaded


def find_scenario_files(paths: list[str | Path]) -> list[Path]:
    """Files as given; folders searched (recursively, sorted) for `*.yaml` / `*.yml` files that have a
    top-level `scenarios:` (or pipecat's older top-level `turns:`) key, so that agent and flow files,
    and the fragments scenario files `!include`, kept beside them are passed over."""
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
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return True  # let load_scenarios say why it cannot be read
    return re.search(r"^(scenarios|turns)\s*:", text, re.MULTILINE) is not None


def unknown_key(key: Any, known: tuple[str, ...] | list[str], where: str = "") -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    if close:
        return f"unknown key{where}; did you mean {close[0]!r}?"
    return f"unknown key{where}; expected one of {', '.join(known)}"


# -- reading: pipecat's YAML dialect (decimal-only integers, `!include`), with line numbers ---------


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `012` as octal; a keypad entry must keep its digits, as pipecat's reader does."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"), list("-+0123456789"))


def _compose(path: Path, seen: tuple[Path, ...]) -> yaml.Node | None:
    """The file's node tree with every `!include <path>` replaced by that file's tree (relative to the
    including file), so line numbers stay available."""
    loader = _Loader(path.read_text(encoding="utf-8"))
    try:
        root = loader.get_single_node()
    finally:
        loader.dispose()
    return _splice(root, path, seen + (path.resolve(),))


def _splice(node: yaml.Node | None, path: Path, seen: tuple[Path, ...]) -> yaml.Node | None:
    if isinstance(node, yaml.ScalarNode) and node.tag == "!include":
        target = (path.parent / node.value).resolve()
        mark = node.start_mark
        if target in seen:
            raise yaml.MarkedYAMLError(problem=f"!include {node.value!r} includes itself", problem_mark=mark)
        try:
            included = _compose(target, seen)
        except OSError as exc:
            raise yaml.MarkedYAMLError(
                problem=f"!include {node.value!r}: {exc.strerror or exc} (looked for {target})", problem_mark=mark
            ) from None
        return included if included is not None else yaml.ScalarNode("tag:yaml.org,2002:null", "", mark, mark)
    if isinstance(node, yaml.MappingNode):
        node.value = [(k, _splice(v, path, seen)) for k, v in node.value]
    elif isinstance(node, yaml.SequenceNode):
        node.value = [_splice(v, path, seen) for v in node.value]
    return node


def _read(path: Path) -> tuple[yaml.Node | None, dict]:
    def fail(line: int | None, message: str) -> ScenarioFileError:
        return ScenarioFileError(path, [(line, "", message)])

    try:
        root = _compose(path, ())
        data = _Loader("").construct_document(root) if root is not None else None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise fail(None, f"cannot be read ({reason}); expected a UTF-8 YAML file") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        detail = f"{exc.context}, {exc.problem}" if exc.context else exc.problem
        raise fail(mark.line + 1 if mark else None, f"invalid YAML: {detail}") from None
    except yaml.YAMLError as exc:
        raise fail(None, f"invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        found = "the file is empty" if root is None else f"{show(data)} at the top level"
        raise fail(1, f"{found}; expected a mapping with a scenarios list")
    return root, data


class _Checker:
    """Checks every part on its own, so one bad part does not hide the problems in the others."""

    def __init__(self, base: Path, lines: Lines, path: Path):
        self.base, self.lines, self.path = base, lines, path
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
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            value = str(value)  # pipecat's `dtmf: 123`; `012` stays a string (see _Loader)
        if not isinstance(value, str) or not DTMF.fullmatch(value):
            self.bad(loc, value, "a quoted string of DTMF keys: 0-9, *, #, A-D (or a number)")
            return None
        return value

    def boolean(self, loc: Loc, value: Any) -> bool | None:
        if not isinstance(value, bool):
            self.bad(loc, value, "true or false")
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
        self.keys((), {k: v for k, v in data.items() if k != "persona"}, _FILE_KEYS)
        if "persona" in data:
            self.problem(("persona",), "a simulation; expected scripted scenarios (turns:), which is what this runs")
        agent = self.file_path(("agent",), data["agent"], "an agent file") if "agent" in data else None
        transport = data.get("transport")
        if transport is not None and transport not in TRANSPORTS:
            self.bad(("transport",), transport, f"one of {', '.join(TRANSPORTS)}")
            transport = None
        name = self.text(("name",), data["name"], "the file's name, a string") if "name" in data else None
        defaults = {key: data[key] for key in _DEFAULT_KEYS if key in data}
        if "runs" in defaults:
            defaults["runs"] = self.runs(("runs",), defaults["runs"]) or 1
        if "scenarios" not in data:
            if "turns" in data and name is not None:  # pipecat's older shape: the one scenario at the top
                scenario = self.scenario((), {"name": name}, defaults)
                return ScenarioFile(path, agent, transport, [scenario] if scenario else [], name)
            self.problem(("scenarios",), "missing; expected a list of scenarios")
        entries = self.items(("scenarios",), data.get("scenarios", []), "a list of scenarios")
        if "scenarios" in data and isinstance(data["scenarios"], list) and not entries:
            self.problem(("scenarios",), "empty; expected at least one scenario")
        scenarios, names = [], {}
        for i, entry in enumerate(entries):
            entry_name = entry.get("name") if isinstance(entry, dict) else None
            if isinstance(entry_name, str) and entry_name in names:
                self.problem(
                    ("scenarios", i, "name"),
                    f"{entry_name!r} is not allowed; expected a name not used before "
                    f"(scenarios[{names[entry_name]}] has it)",
                )
            elif isinstance(entry_name, str):
                names[entry_name] = i
            scenario = self.scenario(("scenarios", i), entry, defaults)
            if scenario is not None:
                scenarios.append(scenario)
        return ScenarioFile(path=path, agent=agent, transport=transport, scenarios=scenarios, name=name)

    def scenario(self, loc: Loc, data: Any, defaults: dict) -> Scenario | None:
        if self.mapping(loc, data, "a mapping with name and turns") is None:
            return None
        if loc:
            self.keys(loc, data, _SCENARIO_KEYS)
            if "persona" in data:
                self.problem((*loc, "persona"), "a simulation; expected a scripted scenario (turns:)")

        def at(key: str) -> Loc:  # where a key is: in the scenario, else a file-level default
            return (*loc, key) if key in data else (key,)

        given = {**defaults, **data}  # a scenario's key replaces the file's whole value, as in pipecat
        name = self.text((*loc, "name"), data["name"]) if "name" in data else None
        if "name" not in data:
            self.problem((*loc, "name"), "missing; expected the scenario's name")
        runs = self.runs(at("runs"), given["runs"]) if "runs" in data else defaults.get("runs", 1)
        script = self.script(at("script"), given["script"]) if "script" in given else None
        if "turns" not in given:
            self.problem((*loc, "turns"), "missing; expected a list of turns")
        entries = self.items(at("turns"), given.get("turns", []), "a list of turns")
        if "turns" in given and isinstance(given["turns"], list) and not entries:
            self.problem(at("turns"), "empty; expected at least one turn")
        turns = [self.turn((*at("turns"), i), entry) for i, entry in enumerate(entries)]
        expect = self.expectations(at("expect"), given.get("expect", []), turn=None)
        limits, limit_lines = self.limits(at("limits"), given.get("limits", {}))
        judge = self.pipecat_blocks(at, given)
        system_prompt = self.context(at("context"), given["context"]) if "context" in given else None
        if "stop_on_failure" in given:
            self.boolean(at("stop_on_failure"), given["stop_on_failure"])
        if name is None or runs is None or None in turns or judge is False:
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
            judge=judge,
            system_prompt=system_prompt,
        )

    def pipecat_blocks(self, at, given: dict) -> dict | bool:
        """`user:` and `judge:`, checked by pipecat's own parsers; the judge's `eval` block, or False."""
        from pipecat.evals.scenario_config import _parse_judge_block, _parse_user_block

        judge: dict | bool = False
        for key, parse in (("user", _parse_user_block), ("judge", _parse_judge_block)):
            try:
                parsed = parse(given.get(key), self.path)
            except ValueError as exc:
                self.problem(at(key), str(exc).removeprefix(f"{self.path}: "))
                continue
            if key == "judge":
                judge = parsed[2]
        return judge

    def context(self, loc: Loc, value: Any) -> str | None:
        entries = self.items(loc, value, "a list of messages, each {role: system, content: ...}")
        prompts = []
        for i, message in enumerate(entries):
            if not isinstance(message, dict) or message.get("role") not in ("system", "developer"):
                self.problem(
                    (*loc, i),
                    f"{show(message.get('role') if isinstance(message, dict) else message)} is not allowed; "
                    "expected a system message (a speech-to-speech agent is seeded by its system prompt only)",
                )
                continue
            content = self.text((*loc, i, "content"), message.get("content"), "the message's text")
            prompts += [content] if content else []
        return "\n\n".join(prompts) if prompts else None

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
        if self.mapping(loc, data, "a mapping with one of user, audio, dtmf, silence_ms, or only expect") is None:
            return None
        self.keys(loc, data, _TURN_KEYS + ("image",))
        if "image" in data:
            self.problem((*loc, "image"), "not supported; the agent takes no images")
        given = [key for key in _TURN_KINDS if key in data]
        if given == ["user", "audio"] or given == ["audio", "user"]:
            given = ["audio"]  # pipecat's shape: the recording, and what it says
        if len(given) > 1:
            self.problem(loc, f"has {' and '.join(given)}; expected exactly one of user, audio, dtmf, silence_ms")
            return None
        key = given[0] if given else None
        turn = Turn(kind=_TURN_KINDS[key] if key else "wait", line=self.lines.of(loc))
        ok = True
        if key == "user":
            turn.text, turn.parts = self.words((*loc, key), data[key])
            ok = turn.text is not None
        elif key == "audio":
            turn.wav = self.wav((*loc, key), data[key])
            if "user" in data:
                turn.text = self.text((*loc, "user"), data["user"], "what the recording says, a string")
            ok = turn.wav is not None
        elif key == "dtmf":
            turn.digits = self.digits((*loc, key), data[key])
            ok = turn.digits is not None
        elif key == "silence_ms":
            turn.silence_ms = self.ms((*loc, key), data[key])
            ok = turn.silence_ms is not None
        if "pause_ms" in data:
            pause = self.ms((*loc, "pause_ms"), data["pause_ms"])
            turn.pause_ms, ok = (pause, ok) if pause is not None else (0.0, False)
        barge_keys = [k for k in ("barge_in_after_ms", "barge_in_at_text", "send_after") if k in data]
        if len(barge_keys) > 1:
            self.problem((*loc, barge_keys[1]), f"not allowed with {barge_keys[0]}; expected one of the two")
            ok = False
        for barge in barge_keys:
            if key is None or (key not in ("user", "audio") and barge != "send_after"):
                self.problem(
                    (*loc, barge),
                    f"not allowed on a {key or 'no-input'} turn; expected only on a user or audio turn",
                )
                ok = False
        if "barge_in_after_ms" in data:
            turn.barge_in_after_ms = self.ms((*loc, "barge_in_after_ms"), data["barge_in_after_ms"])
            ok = ok and turn.barge_in_after_ms is not None
        if "barge_in_at_text" in data:
            turn.barge_in_at_text = self.text((*loc, "barge_in_at_text"), data["barge_in_at_text"])
            ok = ok and turn.barge_in_at_text is not None
        if "send_after" in data and key is not None:
            ok = self.send_after((*loc, "send_after"), data["send_after"], turn) and ok
        turn.expect = self.expectations((*loc, "expect"), data.get("expect", []), turn=turn, barges_in=turn.barges_in)
        return turn if ok else None

    def words(self, loc: Loc, value: Any) -> tuple[str | None, list[str | float] | None]:
        """A turn's `user:`: the caller's words, or pipecat's list of words and `pause_ms:` silences."""
        if not isinstance(value, list):
            return self.text(loc, value, "the caller's words, a non-empty string"), None
        parts: list[str | float] = []
        for i, part in enumerate(value):
            if isinstance(part, str) and part.strip():
                parts.append(part.strip())
            elif isinstance(part, dict) and set(part) == {"pause_ms"} and self.ms((*loc, i, "pause_ms"), part["pause_ms"]):
                parts.append(float(part["pause_ms"]))
            elif not (isinstance(part, dict) and set(part) == {"pause_ms"}):
                self.bad((*loc, i), part, "words, or pause_ms: <milliseconds>")
                return None, None
        words = [p for p in parts if isinstance(p, str)]
        if not words:
            self.bad(loc, value, "at least one item of words beside the pauses")
            return None, None
        return " ".join(words), parts

    def send_after(self, loc: Loc, value: Any, turn: Turn) -> bool:
        data = self.mapping(loc, value, "a mapping with event and/or delay_ms")
        if data is None:
            return False
        self.keys(loc, data, ("event", "delay_ms"))
        delay = self.ms((*loc, "delay_ms"), data.get("delay_ms", 0))
        event = data.get("event")
        if delay is None:
            return False
        if event is None:
            if not delay:
                self.problem(loc, "needs an event or a delay_ms above 0")
                return False
            turn.pause_ms += delay
            return True
        if event not in BARGE_IN_ANCHORS:
            self.bad((*loc, "event"), event, f"one of {', '.join(BARGE_IN_ANCHORS)} (the agent's reply started)")
            return False
        if turn.kind not in ("user", "audio"):
            self.problem((*loc, "event"), f"not allowed on a {turn.kind} turn; expected only on a user or audio turn")
            return False
        turn.barge_in_after_ms = delay
        return True

    def wav(self, loc: Loc, value: Any) -> Path | None:
        """A recording the caller plays: any format libsndfile reads (WAV, FLAC, OGG, MP3), as pipecat takes."""
        from processors.audio_io import AudioFileError, read_audio_channels

        resolved = self.file_path(loc, value, "an audio file (WAV, FLAC, OGG or MP3)")
        if resolved is None:
            return None
        try:
            read_audio_channels(resolved)
        except AudioFileError as exc:
            self.problem(loc, f"{value!r} is not usable audio: {exc.reason}")
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
        known = (
            *_EXPECT_COMMON,
            *(("within_ms",) if rule.within else ()),
            *(("absent",) if rule.absent else ()),
            *rule.params,
        )
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
            elif kind == "text":
                checked = self.text(where, data[key], "a non-empty string")
            elif kind == "dtmf":
                checked = self.digits(where, data[key])
            elif kind == "mapping":
                checked = self.mapping(where, data[key], "a mapping of argument names to values")
            elif kind == "calls":
                checked = self.calls(where, data[key])
            elif kind == "any":
                checked = data[key]
            else:  # "by"
                checked = data[key] if data[key] in ("agent", "caller") else None
                if checked is None:
                    self.bad(where, data[key], "agent or caller")
            ok = ok and checked is not None
            params[key] = checked
        if "check_from" in data and data["check_from"] not in ("previous", "turn_start"):
            self.bad((*loc, "check_from"), data["check_from"], "previous or turn_start")
        absent = bool(rule.absent and data.get("absent") is True)
        if rule.absent and "absent" in data:
            ok = self.boolean((*loc, "absent"), data["absent"]) is not None and ok
            conflicting = [k for k in data if k in rule.params]
            if absent and conflicting:
                self.problem((*loc, "absent"), f"not allowed with {', '.join(conflicting)}; absent matches the event alone")
                ok = False
        if event == "function_call" and ok:
            ok = self.normalise_calls(loc, params)
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
        if not ok:
            return None
        return Expectation(event=event, params=params, within_ms=within, line=self.lines.of(loc), absent=absent)

    def calls(self, loc: Loc, value: Any) -> list | None:
        entries = self.items(loc, value, "a list of calls, each a name or {name, args}")
        if isinstance(value, list) and not entries:
            self.problem(loc, "empty; expected at least one call")
            return None
        out = []
        for i, entry in enumerate(entries):
            if isinstance(entry, str) and entry.strip():
                out.append((entry, None))
            elif isinstance(entry, dict):
                self.keys((*loc, i), entry, ("name", "args", "arguments"), " for a call")
                name = self.text((*loc, i, "name"), entry["name"]) if "name" in entry else None
                args = entry.get("args", entry.get("arguments"))
                if args is not None and self.mapping((*loc, i, "args"), args, "a mapping of argument names to values") is None:
                    return None
                out.append((name, args))
            else:
                self.bad((*loc, i), entry, "a function name or {name, args}")
                return None
        return out if len(out) == len(entries) else None

    def normalise_calls(self, loc: Loc, params: dict) -> bool:
        """ours `name` + `arguments`, pipecat's `name` + `args` or `calls:`, as params["calls"]."""
        if "arguments" in params and "args" in params:
            self.problem((*loc, "args"), "not allowed with arguments; they are the same (pipecat's and ours)")
            return False
        args = params.pop("args", None)
        if args is not None:
            params["arguments"] = args
        if "calls" in params and ("name" in params or "arguments" in params):
            self.problem((*loc, "calls"), "not allowed with name or args; expected calls, or name and args")
            return False
        return True

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
