"""`{{ name }}` placeholders, with the same syntax pipecat's FlowManager fills in node prompts.

`{{ order.status }}` walks into a mapping; `\\{{ name }}` is the literal text `{{ name }}`. Only
identifiers and dots count, so ordinary braces in prose are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

PLACEHOLDER = re.compile(r"(\\?)\{\{\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\s*\}\}")


class MissingValue(KeyError):
    """A placeholder names something that has no value yet."""

    def __init__(self, path: str):
        super().__init__(path)
        self.path = path


def placeholders(text: str) -> list[str]:
    """The dotted names `text` refers to, in order, escaped ones left out."""
    return [m.group(2) for m in PLACEHOLDER.finditer(text) if not m.group(1)]


def lookup(values: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path; MissingValue when any step is absent."""
    current: Any = values
    for part in path.split("."):
        if not isinstance(current, Mapping) or part not in current:
            raise MissingValue(path)
        current = current[part]
    return current


def render(text: str, values: Mapping[str, Any], quote: Callable[[str], str] = str) -> str:
    """`text` with each placeholder replaced by `quote(str(value))`; MissingValue if one has none."""

    def substitute(match: re.Match) -> str:
        if match.group(1):
            return match.group(0)[1:]
        return quote(str(lookup(values, match.group(2))))

    return PLACEHOLDER.sub(substitute, text)
