"""Problems in a YAML file (an agent, flow or scenario file), each on its line, all at once:

    agent.yaml:20: vad.aggressiveness: 7 is not allowed; expected an integer from 0 to 3

A reader gets the file's node tree and value from `read_mapping`, collects each problem as (where,
message), `where` a path of keys and list indexes, and raises its file's `YAMLFileError` with them
located by `Lines`. pydantic's validation errors become problems in the same words
(`from_validation`); a validator whose message is already in those words raises `problem(...)`.
"""

from __future__ import annotations

import difflib
import json
from collections import deque
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pipecat.utils.yaml import include_loader
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

Loc = tuple[Any, ...]
Problem = tuple[Loc, str]  # where in the document (keys and list indexes), what is wrong
Located = tuple[int | None, str, str]  # line (None when not from a line), field, message

_WORDS = "our_words"  # the pydantic error type of `problem`


class YAMLFileError(ValueError):
    """A bad YAML file; str() is every problem, one per line: `file:line: field: message`."""

    def __init__(self, path: str | Path, problems: list[Located]):
        self.path = Path(path)
        self.problems = sorted(problems, key=lambda p: p[0] or 0)
        super().__init__("\n".join(format_problem(path, *p) for p in self.problems))


class FlowFileError(YAMLFileError):
    """A bad flow file."""


def format_problem(path: str | Path, line: int | None, field: str, message: str) -> str:
    where = f"{path}:{line}" if line else str(path)
    return f"{where}: {field}: {message}" if field else f"{where}: {message}"


def dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def show(value: Any) -> str:
    """A value as the user wrote it, short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    shown = repr(value) if isinstance(value, (str, int, float)) else str(value)  # a YAML date as written
    return shown if len(shown) <= 60 else shown[:57] + "..."


def unknown_key(key: Any, known: tuple[str, ...] | list[str] = (), where: str = "") -> str:
    """An unknown key, with the known key it is closest to, else all of them (when they are known)."""
    if not known:
        return f"unknown key{where}"
    close = difflib.get_close_matches(str(key), list(known), n=1)
    if close:
        return f"unknown key{where}; did you mean {close[0]!r}?"
    return f"unknown key{where}; expected one of {', '.join(known)}"


# -- pydantic's errors in our words --------------------------------------------------------------------


def problem(message: str, *, on_parent: bool = False) -> PydanticCustomError:
    """A validator's error whose message is already in our words; `on_parent` reports it on the enclosing
    section (a rule about two of its fields)."""
    return PydanticCustomError(_WORDS, "{message}", {"message": message, "on_parent": on_parent})


def from_validation(exc: ValidationError, prefix: Loc = (), model: type[BaseModel] | None = None) -> list[Problem]:
    """pydantic's errors as problems in our words: the value given and what was expected. With the
    `model` that was validated, its fields say what each one takes (type and bounds) and which keys
    a section has; without, pydantic's error type says what was expected."""
    problems = []
    for error in exc.errors():
        loc, kind, ctx, message = error["loc"], error["type"], error.get("ctx") or {}, error["msg"]
        if kind == _WORDS:
            problems.append(((*prefix, *(loc[:-1] if ctx["on_parent"] else loc)), ctx["message"]))
            continue
        field = _field_at(model, loc) if model is not None else None
        if kind in ("extra_forbidden", "invalid_key"):  # invalid_key: a key that is not a string, like `1:`
            text = unknown_key(loc[-1], known_keys(model, loc[:-1]))
        elif kind == "missing":
            text = f"missing; expected {describe(field)}" if field is not None else "missing"
        elif isinstance(error["input"], dict) and kind == "value_error":  # a rule about the whole entry
            text = message.removeprefix("Value error, ")
        else:
            expected = describe(field) if field is not None else _expected(kind, ctx)
            if expected is None and kind == "value_error":  # a validator's ValueError says what it takes
                expected = message.removeprefix("Value error, ")
            given = show(error["input"])
            text = (
                f"{given} is not allowed; expected {expected[0].lower()}{expected[1:]}"
                if expected
                else f"{given} is not allowed ({message[0].lower()}{message[1:]})"
            )
        problems.append(((*prefix, *loc), text))
    return problems


_EXPECTED = {
    "greater_than_equal": "at least {ge}",
    "less_than_equal": "at most {le}",
    "greater_than": "more than {gt}",
    "less_than": "less than {lt}",
    "literal_error": "one of {expected}",
    "string_type": "a string",
    "string_too_short": "a non-empty string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "dict_type": "a mapping",
    "list_type": "a list",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _expected(kind: str, ctx: dict) -> str | None:
    template = _EXPECTED.get(kind)
    try:
        return template.format(**ctx) if template else None
    except KeyError:
        return None


def _field_at(model: type[BaseModel], loc: Loc) -> FieldInfo | None:
    """The model's field at `loc` (through nested models), or None where `loc` leaves the models."""
    section: Any = model
    field = None
    for part in loc:
        if not (isinstance(section, type) and issubclass(section, BaseModel)) or part not in section.model_fields:
            return None
        field = section.model_fields[part]
        section = _unwrap(field.annotation)
    return field


def known_keys(model: type[BaseModel] | None, loc: Loc = ()) -> list[str]:
    """The keys the section at `loc` takes; none known where it is not one of the model's sections."""
    section = model if not loc or model is None else None
    if loc and model is not None:
        field = _field_at(model, loc)
        section = _unwrap(field.annotation) if field is not None else None
    if not (isinstance(section, type) and issubclass(section, BaseModel)):
        return []
    return [name for name, field in section.model_fields.items() if not field.exclude]


def _unwrap(annotation: Any) -> Any:
    """X from `X | None` and from `Annotated[X, ...]`."""
    while True:
        if get_origin(annotation) in (Union, UnionType):
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        elif get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
        else:
            return annotation


def describe(field: FieldInfo) -> str:
    """What a field takes, in words, from its type and constraints."""
    kind = _unwrap(field.annotation)
    if get_origin(kind) is Literal:
        return "one of " + ", ".join(show(v) for v in get_args(kind))
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return "a mapping with keys " + ", ".join(kind.model_fields)
    if kind is bool:
        return "true or false"
    noun = {int: "an integer", float: "a number", str: "a string", Path: "a path"}.get(kind, "a value")
    limits = {
        n: getattr(m, n)
        for m in field.metadata
        for n in ("ge", "gt", "le", "lt", "min_length")
        if getattr(m, n, None) is not None
    }
    if limits.get("min_length"):
        noun = f"a non-empty {noun.removeprefix('a ').removeprefix('n ')}"
    if "ge" in limits and "le" in limits:
        return f"{noun} from {limits['ge']} to {limits['le']}"
    words = {"gt": "greater than", "ge": "at least", "lt": "less than", "le": "at most"}
    bounds = [f"{words[n]} {limits[n]}" for n in words if n in limits]
    return " ".join([noun, " and ".join(bounds)]) if bounds else noun


# -- where each problem is -----------------------------------------------------------------------------


class Lines:
    """Line of every key and value in a YAML document, by its path of keys and list indexes; and the
    keys given twice, which YAML itself lets through with the last one winning."""

    def __init__(self, root: yaml.Node | None):
        self._keys: dict[Loc, int] = {}
        self._values: dict[Loc, int] = {}
        self.duplicates: list[Located] = []
        # Breadth first, so that of a key given twice the later one (the one YAML keeps) is located.
        todo = deque([((), root)] if root is not None else [])
        seen: set[int] = set()  # aliases can make the tree a graph
        while todo:
            loc, node = todo.popleft()
            if id(node) in seen:
                continue
            seen.add(id(node))
            # an empty value (`key:`) has its mark where the next token starts, often the next line
            if isinstance(node, yaml.ScalarNode) and node.value != "":
                self._values[loc] = node.start_mark.line + 1
            if isinstance(node, yaml.MappingNode):
                given: dict[str, int] = {}
                for key_node, value_node in node.value:
                    if not isinstance(key_node, yaml.ScalarNode):  # a list or mapping as a key: not a field
                        continue
                    here = (*loc, key_node.value)
                    line = key_node.start_mark.line + 1
                    if key_node.value in given:
                        first = given[key_node.value]
                        self.duplicates.append((line, dotted(here), f"duplicate key; first given on line {first}"))
                    given[key_node.value] = self._keys[here] = line
                    todo.append((here, value_node))
            elif isinstance(node, yaml.SequenceNode):
                for i, item in enumerate(node.value):
                    self._keys[(*loc, i)] = item.start_mark.line + 1  # a list item is located by its dash
                    todo.append(((*loc, i), item))

    def of(self, loc: Loc) -> int:
        """The line of `loc`: its value when that is a scalar, else its key (or list dash); for
        something not in the file (a missing key), the nearest enclosing entry's."""
        at = tuple(p if isinstance(p, int) else str(p) for p in loc)
        while at:
            line = self._values.get(at) or self._keys.get(at)
            if line is not None:
                return line
            at = at[:-1]
        return 1

    def locate(self, problems: list[Problem]) -> list[Located]:
        """Each problem with its line and its field, dotted."""
        return [(self.of(loc), dotted(loc), message) for loc, message in problems]


# -- reading -----------------------------------------------------------------------------------------------


def parse(text: str, loader_class: type[yaml.SafeLoader] = yaml.SafeLoader) -> tuple[yaml.Node | None, Any]:
    """The document's node tree (for line numbers) and its Python value."""
    loader = loader_class(text)
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    finally:
        loader.dispose()


class IncludeError(yaml.MarkedYAMLError):
    """An `!include` whose file cannot be read or parsed; located at the tag."""


def include_loader_for(base: Path) -> type[yaml.SafeLoader]:
    """pipecat's `!include` loader (paths relative to `base`), with a failed include located at its
    tag rather than raised as a bare OSError."""
    loader_class = include_loader(base)
    include = loader_class.yaml_constructors["!include"]

    def located(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        try:
            return include(loader, node)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            what = f"!include {node.value!r} cannot be read ({reason}; looked for {base / str(node.value)})"
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            at = f" at line {mark.line + 1}" if mark else ""
            what = f"!include {node.value!r}: invalid YAML{at}: {exc.problem}"
        raise IncludeError(None, None, what, node.start_mark)

    loader_class.add_constructor("!include", located)
    return loader_class


def read_mapping(
    path: Path, error: type[YAMLFileError], expected: str, loader: type[yaml.SafeLoader] = yaml.SafeLoader
) -> tuple[yaml.Node | None, dict]:
    """A YAML (or JSON) file's root node and its top-level mapping, or `error` naming the file (and the
    line of bad YAML). `expected` says what the top level should hold, e.g. "a mapping with
    initial_node". `loader` reads the text, e.g. `include_loader_for(folder)` for `!include`."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise error(path, [(None, "", f"cannot be read ({reason}); expected a UTF-8 YAML file")]) from None
    try:
        root, data = parse(text, loader)
    except IncludeError as exc:
        raise error(path, [(exc.problem_mark.line + 1, "", exc.problem)]) from None
    except yaml.YAMLError as exc:
        if path.suffix.lower() == ".json":  # JSON that YAML 1.1 does not read (tabs, some escapes): no lines
            root, data = None, _json(path, text, error)
        elif isinstance(exc, yaml.MarkedYAMLError):
            mark = exc.problem_mark or exc.context_mark
            detail = f"{exc.context}, {exc.problem}" if exc.context else exc.problem
            raise error(path, [(mark.line + 1 if mark else None, "", f"invalid YAML: {detail}")]) from None
        else:
            raise error(path, [(None, "", f"invalid YAML: {exc}")]) from None
    if not isinstance(data, dict):
        found = "the file is empty" if data is None and root is None else f"{show(data)} at the top level"
        line = root.start_mark.line + 1 if root is not None else None
        raise error(path, [(line, "", f"{found}; expected {expected}")])
    return root, data


def _json(path: Path, text: str, error: type[YAMLFileError]) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(path, [(exc.lineno, "", f"invalid JSON: {exc.msg}")]) from None
