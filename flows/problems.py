"""Problems in a flow file, each with the line it is on: `file:line: field: message`, all at once."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

import yaml
from pipecat.utils.yaml import include_loader
from pydantic import ValidationError

Loc = tuple[Any, ...]
Problem = tuple[Loc, str]  # where in the document (keys and list indexes), what is wrong


class FlowFileError(ValueError):
    """A bad flow file; str() is every problem, one per line: `file:line: field: message`."""

    def __init__(self, path: str | Path, problems: list[tuple[int | None, str, str]]):
        self.path = Path(path)
        self.problems = sorted(problems, key=lambda p: p[0] or 0)
        super().__init__("\n".join(format_problem(path, *p) for p in self.problems))


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
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def from_validation(exc: ValidationError, prefix: Loc = ()) -> list[Problem]:
    """pydantic's errors as problems in our words: the value given and what was expected."""
    problems = []
    for error in exc.errors():
        loc = (*prefix, *error["loc"])
        kind, message = error["type"], error["msg"]
        if kind == "extra_forbidden":
            text = "unknown key"
        elif kind == "missing":
            text = "missing"
        elif kind == "flow_file":
            text = error["ctx"]["message"]
        elif isinstance(error["input"], dict) and kind == "value_error":  # a rule about the whole entry
            text = message.removeprefix("Value error, ")
        else:
            expected = _expected(kind, error.get("ctx") or {}) or message.removeprefix("Value error, ")
            text = f"{show(error['input'])} is not allowed; expected {expected[0].lower()}{expected[1:]}"
        problems.append((loc, text))
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


class Lines:
    """Line of every key and value in a YAML document, by its path of keys and list indexes."""

    def __init__(self, root: yaml.Node | None):
        self._keys: dict[Loc, int] = {}
        self._values: dict[Loc, int] = {}
        self.duplicates: list[tuple[int, str, str]] = []  # already located: line, field, message
        # Breadth first, so that of a key given twice the later one (the one YAML keeps) is located.
        todo = deque([((), root)] if root is not None else [])
        seen: set[int] = set()  # aliases can make the tree a graph
        while todo:
            loc, node = todo.popleft()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, yaml.ScalarNode):
                self._values[loc] = node.start_mark.line + 1
            if isinstance(node, yaml.MappingNode):
                given: dict[str, int] = {}
                for key_node, value_node in node.value:
                    here = (*loc, key_node.value)
                    line = key_node.start_mark.line + 1
                    if key_node.value in given:
                        first = given[key_node.value]
                        self.duplicates.append(
                            (line, dotted(here), f"duplicate key; first given on line {first}")
                        )
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
            problem = f"!include {node.value!r} cannot be read ({reason}; looked for {base / str(node.value)})"
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            at = f" at line {mark.line + 1}" if mark else ""
            problem = f"!include {node.value!r}: invalid YAML{at}: {exc.problem}"
        raise IncludeError(None, None, problem, node.start_mark)

    loader_class.add_constructor("!include", located)
    return loader_class


def read_mapping(
    path: Path, error: type[FlowFileError], expected: str, *, includes: bool = False
) -> tuple[Any, dict]:
    """A YAML (or JSON) file's root node and its top-level mapping, or `error` naming the file (and the
    line of bad YAML). `expected` says what the top level should hold, e.g. "a mapping with
    initial_node". With `includes`, `!include other.yaml` reads a file relative to this one, as
    pipecat's loaders do; a JSON file has no includes."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise error(path, [(None, "", f"cannot be read ({reason}); expected a UTF-8 YAML file")]) from None
    is_json = path.suffix.lower() == ".json"
    loader_class = include_loader_for(path.resolve().parent) if includes and not is_json else yaml.SafeLoader
    try:
        root, data = parse(text, loader_class)
    except IncludeError as exc:
        raise error(path, [(exc.problem_mark.line + 1, "", exc.problem)]) from None
    except yaml.YAMLError as exc:
        if is_json:  # JSON that YAML 1.1 does not read (tabs, some escapes): no lines, same data
            root, data = None, _json(path, text, error)
        elif isinstance(exc, yaml.MarkedYAMLError):
            mark = exc.problem_mark or exc.context_mark
            detail = f"{exc.context}, {exc.problem}" if exc.context else exc.problem
            raise error(path, [(mark.line + 1 if mark else None, "", f"invalid YAML: {detail}")]) from None
        else:
            raise error(path, [(None, "", f"invalid YAML: {exc}")]) from None
    if not isinstance(data, dict):
        found = "the file is empty" if root is None and data is None else f"{show(data)} at the top level"
        raise error(path, [(1, "", f"{found}; expected {expected}")])
    return root, data


def _json(path: Path, text: str, error: type[FlowFileError]) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(path, [(exc.lineno, "", f"invalid JSON: {exc.msg}")]) from None
