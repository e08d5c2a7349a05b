"""Reading scenario files: pipecat evals' scripted-scenario format (`pipecat.evals.scenario`) with our
additions, checked in full into a `ScenarioFile` (see `agent.testing.scenario` for the format).

    scenarios = load_scenarios("examples/scenarios/appointments.yaml")

Every problem fails the load, all of them reported together, each as `file:line: field: message`
(worded and located by `flows.problems`, as an agent file's and a flow file's are).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from flows.problems import Lines, Loc, Problem, read_mapping, show, unknown_key

from .scenario import (
    BARGE_IN_ANCHORS,
    DTMF,
    EVENTS,
    LIMIT_KEYS,
    PERCENTILES,
    TRANSPORTS,
    Expectation,
    Scenario,
    ScenarioFile,
    ScenarioFileError,
    Turn,
)

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


def load_scenarios(path: str | Path) -> ScenarioFile:
    """Read and check a scenario file; raises ScenarioFileError naming every problem."""
    path = Path(path)
    root, data = read_mapping(path, ScenarioFileError, "a mapping with a scenarios list", _including(path))
    lines = Lines(root)
    checker = _Checker(path.resolve().parent, lines, path)
    loaded = checker.file(path, data)
    problems = lines.duplicates + lines.locate(checker.problems)
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


# -- reading: pipecat's YAML dialect (decimal-only integers, `!include`), with line numbers ---------


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `012` as octal; a keypad entry must keep its digits, as pipecat's reader does."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"), list("-+0123456789"))


def _including(path: Path, seen: tuple[Path, ...] = ()) -> type[_Loader]:
    """A loader for the file at `path` whose node tree has every `!include <path>` replaced by that
    file's tree (relative to the including file), so line numbers stay available."""
    seen = (*seen, path.resolve())

    class Including(_Loader):
        def get_single_node(self) -> yaml.Node | None:
            return _splice(super().get_single_node(), path, seen)

    return Including


def _splice(node: yaml.Node | None, path: Path, seen: tuple[Path, ...]) -> yaml.Node | None:
    if isinstance(node, yaml.ScalarNode) and node.tag == "!include":
        target = (path.parent / node.value).resolve()
        mark = node.start_mark
        if target in seen:
            raise yaml.MarkedYAMLError(problem=f"!include {node.value!r} includes itself", problem_mark=mark)
        try:
            loader = _including(target, seen)(target.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise yaml.MarkedYAMLError(
                problem=f"!include {node.value!r}: {reason} (looked for {target})", problem_mark=mark
            ) from None
        try:
            included = loader.get_single_node()
        finally:
            loader.dispose()
        return included if included is not None else yaml.ScalarNode("tag:yaml.org,2002:null", "", mark, mark)
    if isinstance(node, yaml.MappingNode):
        node.value = [(k, _splice(v, path, seen)) for k, v in node.value]
    elif isinstance(node, yaml.SequenceNode):
        node.value = [_splice(v, path, seen) for v in node.value]
    return node


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
