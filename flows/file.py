"""The flow file: pipecat's flow format (`FlowConfig` YAML) with what a phone agent adds, checked in
full before the first call.

    flow = load_flow("examples/flows/customer_service/flow.yaml")
    flow.config         # pipecat's FlowConfig: nodes, functions, transitions, actions
    flow.tools          # name -> ToolSpec (flows.tools)
    flow.voices, flow.dtmf, flow.state

A file pipecat's own `FlowConfig.from_file` and `Flow(config, handlers=module)` accept runs here as
it is: a function entry names a direct function in the flow's handlers module (`flows.handlers`),
actions are pipecat's (`tts_say`, `end_conversation`, `function`, custom types), `!include` reads a
file relative to this one, and a `.json` file loads like a YAML one. pipecat's `Flow` builds the
nodes (`flows.runtime`).

What the file may add to pipecat's format, none of which pipecat itself sees (`FlowFile.extensions`
lists where a file uses them):

- `tools:` Python and HTTP tools declared in the file (see `flows.tools`); a function entry may name
  one of them instead of a handler;
- per node, `voice:` (a voice name from the library, or a voice folder relative to the flow file)
  and `collect_dtmf:` (see `flows.dtmf`);
- the actions `end_call`, `transfer_call`, `send_dtmf`, `play` and `say` (see `flows.actions`);
- `state:` initial values for `{{ placeholders }}` (the call side may add more at the start).

Every problem fails the load, all of them reported together, each as `file:line: field: message`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from pipecat.flows import Flow, FlowConfig, FlowReferenceError
from pipecat.flows.types import FlowsDirectFunctionWrapper
from pydantic import ConfigDict, Field, StrictStr, ValidationError, field_validator

from voices.library import voice_path
from voices.profile import PROFILE_FILE

from .actions import TELEPHONY_ACTIONS, check_action
from .dtmf import DtmfSpec
from .handlers import Handlers, HandlersError, UnreadHandlers, default_ref, load_handlers
from .problems import (
    FlowFileError,
    Lines,
    Loc,
    Problem,
    format_problem,
    from_validation,
    include_loader_for,
    read_mapping,
    show,
)
from .schema import schema_problems
from .templates import placeholders
from .tools import ENV_VALUE, TOOL_NAME, ToolSpec, load_python, signature_problems

TOP_LEVEL = ("initial_node", "nodes", "global_functions", "tools", "state")
CALL_STATE = ("caller_number",)  # what every call puts in state before the first node (empty off the phone)
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class NodeSpec(FlowConfig.Node):
    """pipecat's node, plus the voice it speaks in and the digits it collects."""

    model_config = ConfigDict(extra="forbid")

    voice: StrictStr | None = Field(
        None, min_length=1, description="A voice name from the voice library, or a voice folder relative to the flow file."
    )
    collect_dtmf: DtmfSpec | None = Field(None, description="Collect keypad digits and route on them.")

    @field_validator("voice")
    @classmethod
    def _voice_name(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("a voice name")
        return value


@dataclass(frozen=True)
class FlowFile:
    """A checked flow file. `config` is exactly what pipecat's flow format describes."""

    path: Path
    config: FlowConfig
    tools: dict[str, ToolSpec]
    functions: dict[str, Callable] = field(default_factory=dict)  # Python tools, by tool name
    voices: dict[str, str] = field(default_factory=dict)  # node -> library name or absolute voice folder
    dtmf: dict[str, DtmfSpec] = field(default_factory=dict)  # node -> how it collects digits
    state: dict[str, Any] = field(default_factory=dict)  # initial values of state
    handlers: Handlers | None = None  # the handlers module the functions and actions name
    extensions: list[str] = field(default_factory=list)  # `file:line: field: ...`, each key of ours used
    notes: list[str] = field(default_factory=list)  # `file:line: field: ...`, worth knowing, not wrong

    def environment(self) -> dict[str, list[str]]:
        """Environment variables the HTTP tools read at call time, with the tools that read each."""
        names: dict[str, list[str]] = {}
        for name, tool in self.tools.items():
            for text in tool.http.headers.values() if tool.http else ():
                for variable in ENV_VALUE.findall(text):
                    names.setdefault(variable, []).append(name)
        return names

    def pipecat_config(self) -> FlowConfig:
        """The config without the functions that name our `tools:`: what pipecat's `Flow` builds, with
        the handlers module alone."""

        def theirs(functions: list[FlowConfig.Function]) -> list[FlowConfig.Function]:
            return [f for f in functions if f.transition_only or f.name not in self.tools]

        nodes = {
            name: node.model_copy(update={"functions": theirs(node.functions)})
            for name, node in self.config.nodes.items()
        }
        return self.config.model_copy(
            update={"nodes": nodes, "global_functions": theirs(self.config.global_functions)}
        )

    def pipecat_flow(self) -> Flow:
        """pipecat's `Flow` for this file: its nodes built, its handlers resolved (a fresh one per call)."""
        return Flow(self.pipecat_config(), handlers=[self.handlers.module] if self.handlers else [])


def load_flow(path: str | Path, handlers: str | Path | ModuleType | None = None) -> FlowFile:
    """Read and check a flow file; raises FlowFileError naming every problem.

    `handlers` is the handlers module: an absolute file path, a module name, or a module; without it,
    a `handlers.py` beside the flow file is used when there is one."""
    path = Path(path)
    root, data = read_mapping(
        path, FlowFileError, "a mapping with initial_node and nodes", include_loader_for(path.resolve().parent)
    )
    lines = Lines(root)
    ref = handlers if handlers is not None else default_ref(path)
    loaded, handler_problems = None, []
    if ref is not None:
        try:
            loaded = load_handlers(ref)
        except HandlersError as exc:
            handler_problems.append((None, "handlers", str(exc)))
            loaded = UnreadHandlers(str(ref))
    checker = _Checker(path.resolve().parent, data, loaded)
    flow = checker.run(path)
    problems = lines.duplicates + handler_problems + lines.locate(checker.problems)
    if problems:
        raise FlowFileError(path, problems)

    def at(items: list[Problem]) -> list[str]:
        return [format_problem(path, *p) for p in sorted(lines.locate(items), key=lambda p: p[0])]

    return replace(flow, extensions=at(checker.extensions), notes=at(checker.notes))


class _Checker:
    """Checks each section on its own, so one bad part does not hide the problems in the others."""

    def __init__(self, base: Path, data: dict[str, Any], handlers: Handlers | None):
        self.base, self.data, self.handlers = base, data, handlers
        self.problems: list[Problem] = []
        self.extensions: list[Problem] = []  # where the file uses a key of ours, and which
        self.notes: list[Problem] = []
        self.tools: dict[str, ToolSpec] = {}
        self.functions: dict[str, Callable] = {}
        self.nodes: dict[str, NodeSpec] = {}
        self.actions: dict[Loc, list[dict]] = {}
        self.node_functions: dict[str, list[FlowConfig.Function]] = {}
        self.node_dtmf: dict[str, DtmfSpec | None] = {}

    def problem(self, loc: Loc, message: str) -> None:
        self.problems.append((loc, message))

    def run(self, path: Path) -> FlowFile | None:
        for key in self.data:
            if key not in TOP_LEVEL:
                self.problem((key,), f"unknown key; expected one of {', '.join(TOP_LEVEL)}")
        for key in ("tools", "state"):
            if key in self.data:
                self.extensions.append(((key,), f"ours ({'Python and HTTP tools' if key == 'tools' else 'initial state'})"))
        state = self._mapping("state")
        for key in state:
            if not isinstance(key, str) or not IDENTIFIER.match(key):
                self.problem(
                    ("state", str(key)),
                    f"{show(key)} is not allowed as a state name; expected letters, digits and _",
                )
        for name, raw in self._mapping("tools").items():
            self._tool(name, raw)
        nodes = self._mapping("nodes", required=True)
        for name, raw in nodes.items():
            if isinstance(name, str):
                self._node(name, raw)
            else:
                self.problem(
                    ("nodes", str(name)), f"{show(name)} is not allowed as a node name; expected text"
                )
        globals_ = self._functions(self.data.get("global_functions", []), ("global_functions",))
        initial = self.data.get("initial_node")
        if initial is None:
            self.problem(("initial_node",), "missing; expected the name of the node the call starts in")
        elif not isinstance(initial, str) or initial not in nodes:
            self.problem(
                ("initial_node",),
                f"{show(initial)} is not a node; expected one of {', '.join(map(str, nodes))}",
            )
        self._references(nodes, globals_, state)
        if self.problems or isinstance(self.handlers, UnreadHandlers):
            return None
        return self._build(path, globals_, state)

    def _mapping(self, key: str, required: bool = False) -> dict:
        value = self.data.get(key)
        if value is None:
            if required:
                self.problem((key,), "missing; expected a mapping of name to node")
            return {}
        if not isinstance(value, dict) or (required and not value):
            self.problem((key,), f"{show(value)} is not allowed; expected a non-empty mapping")
            return {}
        return value

    def _tool(self, name: Any, raw: Any) -> None:
        loc = ("tools", str(name))
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            self.problem(
                loc, f"{show(name)} is not allowed as a tool name; expected letters, digits and _ (up to 64)"
            )
            return
        try:
            tool = ToolSpec.model_validate(raw)
        except ValidationError as exc:
            self.problems += from_validation(exc, loc)
            return
        schema = schema_problems(tool.parameters)
        for where, message in schema:
            self.problem((*loc, "parameters", *where), message)
        if tool.store_as is not None and not IDENTIFIER.match(tool.store_as):
            self.problem(
                (*loc, "store_as"), f"{tool.store_as!r} is not allowed; expected letters, digits and _"
            )
        if tool.python is not None:
            try:
                function = load_python(tool.python, self.base)
            except (ImportError, AttributeError) as exc:
                self.problem((*loc, "python"), f"{tool.python!r} cannot be loaded: {exc}")
            else:
                self.functions[name] = function
                if not schema:
                    for message in signature_problems(function, tool.parameters):
                        self.problem((*loc, "python"), f"{tool.python!r}: {message}")
        self.tools[name] = tool

    def _node(self, name: str, raw: Any) -> None:
        loc = ("nodes", name)
        if not isinstance(raw, dict):
            self.problem(loc, f"{show(raw)} is not allowed; expected a node: a mapping with task_messages")
            return
        raw = dict(raw)
        for key in ("pre_actions", "post_actions"):
            actions = raw.pop(key, None) or []
            if not isinstance(actions, list):
                self.problem((*loc, key), f"{show(actions)} is not allowed; expected a list of actions")
                continue
            checked = []
            for i, action in enumerate(actions):
                built, problems = check_action(action, self.base, self.handlers)
                if built is not None and built["type"] in TELEPHONY_ACTIONS:
                    self.extensions.append(((*loc, key, i, "type"), f"ours (the telephony action {built['type']})"))
                self.problems += [((*loc, key, i, *where), message) for where, message in problems]
                checked.append(built)
            self.actions[(name, key)] = checked
        # Functions and keypad settings are checked apart from the rest, so that one bad field does
        # not hide the references the others make.
        functions = self._functions(raw.pop("functions", None) or [], (*loc, "functions"))
        self.node_functions[name] = functions
        seen: set[str] = set()
        for i, function in enumerate(functions):
            if function.name in seen:
                self.problem((*loc, "functions", i, "name"), f"{function.name!r} is given twice in this node")
            seen.add(function.name)
        dtmf = None
        if raw.get("collect_dtmf") is not None:
            try:
                dtmf = DtmfSpec.model_validate(raw["collect_dtmf"])
            except ValidationError as exc:
                self.problems += from_validation(exc, (*loc, "collect_dtmf"))
            self.node_dtmf[name] = dtmf
        raw.pop("collect_dtmf", None)
        for key in ("voice", "collect_dtmf"):
            if key in raw or (key == "collect_dtmf" and name in self.node_dtmf):
                self.extensions.append(((*loc, key), "ours"))
        try:
            node = NodeSpec.model_validate(raw)
        except ValidationError as exc:
            self.problems += from_validation(exc, loc)
        else:
            voice = self._voice_folder(node.voice, (*loc, "voice"))
            self.nodes[name] = node.model_copy(update={"functions": functions, "collect_dtmf": dtmf, "voice": voice})

    def _voice_folder(self, ref: str | None, loc: Loc) -> str | None:
        """A voice folder written as a path, made absolute (relative to the flow file) and checked;
        a library name is kept as it is: the agent's library resolves it."""
        folder = voice_path(ref, self.base) if ref else None
        if folder is None:
            return ref
        if not (folder / PROFILE_FILE).is_file():
            self.problem(loc, f"{ref!r} is not a voice folder (looked for {folder / PROFILE_FILE}); expected a "
                              "folder holding voice.yaml, or a voice name from the library")
        return str(folder)

    def _functions(self, raw: Any, loc: Loc) -> list[FlowConfig.Function]:
        if not isinstance(raw, list):
            self.problem(loc, f"{show(raw)} is not allowed; expected a list of functions")
            return []
        functions = []
        for i, item in enumerate(raw):
            if isinstance(item, dict) and "description" in item and not item.get("transition_only"):
                # pipecat's own message points at a Python docstring; here tools describe themselves
                self.problem(
                    (*loc, i, "description"),
                    "only a transition_only function takes a description; a handler describes itself "
                    "in its docstring, a tool in its declaration under tools:",
                )
                continue
            try:
                functions.append(FlowConfig.Function.model_validate(item))
            except ValidationError as exc:
                self.problems += from_validation(exc, (*loc, i))
        return functions

    def _references(self, nodes: dict, globals_: list[FlowConfig.Function], state: dict) -> None:
        known_nodes = {str(n) for n in nodes}
        global_names = {f.name for f in globals_}
        for i, function in enumerate(globals_):
            self._function(function, ("global_functions", i), known_nodes)
        for name, functions in self.node_functions.items():
            for i, function in enumerate(functions):
                loc = ("nodes", name, "functions", i)
                if function.name in global_names:
                    self.problem(
                        (*loc, "name"), f"{function.name!r} is also a global function; give it one place"
                    )
                self._function(function, loc, known_nodes)
        for name, dtmf in self.node_dtmf.items():
            if dtmf is not None:
                dtmf_loc = ("nodes", name, "collect_dtmf")
                for where, message in dtmf.route_problems():
                    self.problem((*dtmf_loc, *where), message)
                for where, target in dtmf.targets():
                    if target not in known_nodes:
                        self.problem((*dtmf_loc, *where), _unknown_node(target, known_nodes))
        self._placeholders(state)

    def _function(self, function: FlowConfig.Function, loc: Loc, known_nodes: set[str]) -> None:
        tool = None
        if not function.transition_only:
            tool = self.tools.get(function.name)
            declared = self.data.get("tools") if isinstance(self.data.get("tools"), dict) else {}
            if function.name in declared:
                self.extensions.append(((*loc, "name"), f"ours (names {function.name} under tools:)"))
            else:
                self._handler_function(function.name, (*loc, "name"), declared)
        target = function.transition_to
        if isinstance(target, str):
            if target not in known_nodes:
                self.problem((*loc, "transition_to"), _unknown_node(target, known_nodes))
        elif target is not None:
            branch = (*loc, "transition_to")
            for case, node in target.cases.items():
                if node not in known_nodes:
                    self.problem((*branch, "cases", case), _unknown_node(node, known_nodes))
            if target.default is not None and target.default not in known_nodes:
                self.problem((*branch, "default"), _unknown_node(target.default, known_nodes))
            fields = tool.field_names() if tool else None
            if fields is not None and target.field not in fields:
                self.problem(
                    (*branch, "field"),
                    f"{target.field!r} is not a field tool {function.name} returns; expected one of {', '.join(fields)}",
                )

    def _handler_function(self, name: str, loc: Loc, declared: dict) -> None:
        """A function entry naming a pipecat direct function in the handlers module."""
        target = self.handlers.lookup(name) if self.handlers is not None else None
        if target is None:
            where = (
                f"a direct function in the handlers module {self.handlers.where}"
                if self.handlers is not None
                else "a direct function in a handlers module (handlers: in the agent file, flow check "
                "--handlers, or a handlers.py beside the flow file)"
            )
            self.problem(
                loc,
                f"{name!r} is not a tool; expected one declared under tools: "
                f"({', '.join(map(str, declared)) or 'none declared'}), {where}, "
                "or transition_only: true with a description and transition_to",
            )
            return
        try:
            FlowsDirectFunctionWrapper(target)  # pipecat's own check of a tool's signature
        except Exception as exc:
            self.problem(
                loc,
                f"{name!r} in {self.handlers.where} is not a pipecat direct function: {exc}; expected "
                f"async def {name}(flow_manager, <argument>: <type>, ...) with a docstring, returning "
                "(result, TRANSITION_IN_YAML)",
            )

    def _left_to_handlers(self, path: str, head: str) -> str:
        name = Path(self.handlers.where).name
        try:
            mentioned = re.search(rf"""["']{head}["']""", inspect.getsource(self.handlers.module)) is not None
        except (OSError, TypeError):
            mentioned = False
        said = f"{name} mentions {head!r}" if mentioned else f"{name} never mentions {head!r}"
        return (
            f"{{{{ {path} }}}} is left to the handlers ({said}; not checked): unless one has put it in "
            "flow_manager.state by then, pipecat's FlowManager stops at this node"
        )

    def _placeholders(self, state: dict) -> None:
        """Every `{{ name }}` must be something the flow sets: initial state, a tool's result, digits."""
        sources: dict[str, list[str] | None] = {str(k): None for k in (*CALL_STATE, *state)}
        for name, tool in self.tools.items():
            sources[tool.store_as or name] = tool.field_names()
        for dtmf in self.node_dtmf.values():
            if dtmf is not None and dtmf.store_as:
                sources[dtmf.store_as] = None
        texts: list[tuple[Loc, str, set[str] | None]] = []  # where, text, a tool's arguments (URLs)
        for name, node in self.nodes.items():
            if node.role_message:
                texts.append((("nodes", name, "role_message"), node.role_message, None))
            for i, message in enumerate(node.task_messages):
                texts.append((("nodes", name, "task_messages", i, "content"), message.content, None))
        for (name, key), actions in self.actions.items():
            for i, action in enumerate(actions):
                if action and action["type"] in ("say", "tts_say"):
                    texts.append((("nodes", name, key, i, "text"), action["text"], None))
        for name, tool in self.tools.items():
            if tool.http is not None:
                arguments = set(tool.parameters.get("properties", {}))
                texts.append((("tools", name, "http", "url"), tool.http.url, arguments))
        noted: set[str] = set()
        for loc, text, local in texts:
            for path in placeholders(text):
                head, *rest = path.split(".")
                if local is not None and head in local:
                    continue
                if head not in sources and local is None and self.handlers is not None:
                    # A handler may put any key in flow_manager.state; which ones cannot be known here.
                    if head not in noted:
                        noted.add(head)
                        self.notes.append((loc, self._left_to_handlers(path, head)))
                elif head not in sources:
                    where = "an argument of the tool (parameters), " if local is not None else ""
                    self.problem(
                        loc,
                        f"{{{{ {path} }}}} is never set; expected {where}a state: entry, a tool's name or store_as, or a collect_dtmf store_as",
                    )
                elif rest and sources[head] is not None and rest[0] not in sources[head]:
                    self.problem(
                        loc,
                        f"{{{{ {path} }}}}: {rest[0]!r} is not a field the tool returns; expected one of {', '.join(sources[head])}",
                    )

    def _build(self, path: Path, globals_: list, state: dict) -> FlowFile | None:
        nodes = {}
        for name, node in self.nodes.items():
            spec = node.model_dump(exclude={"voice", "collect_dtmf"}, exclude_defaults=True, mode="json")
            spec["task_messages"] = [m.model_dump() for m in node.task_messages]
            for key in ("pre_actions", "post_actions"):
                if self.actions.get((name, key)):
                    spec[key] = self.actions[(name, key)]
            nodes[name] = spec
        # Everything pipecat checks has been checked above, with lines; this builds its objects and
        # has its `Flow` resolve the handlers, as pipecat would at the start of a call.
        try:
            config = FlowConfig.model_validate(
                {
                    "initial_node": self.data["initial_node"],
                    "nodes": nodes,
                    "global_functions": [f.model_dump(exclude_defaults=True, mode="json") for f in globals_],
                }
            )
        except ValidationError as exc:
            self.problem((), f"pipecat's flow format rejects the file: {exc}")
            return None
        flow = FlowFile(
            path=path.resolve(),
            config=config,
            tools=self.tools,
            functions=self.functions,
            voices={n: node.voice for n, node in self.nodes.items() if node.voice},
            dtmf={n: node.collect_dtmf for n, node in self.nodes.items() if node.collect_dtmf},
            state=dict(state),
            handlers=self.handlers,
        )
        try:
            flow.pipecat_flow()
        except FlowReferenceError as exc:
            for problem in exc.problems:
                self.problem(("nodes", problem.node) if problem.node else (), f"pipecat's Flow: {problem.message}")
            return None
        return flow


def _unknown_node(name: str, known: set[str]) -> str:
    return f"{name!r} is not a node; expected one of {', '.join(sorted(known))}"
