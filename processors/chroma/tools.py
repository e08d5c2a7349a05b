"""Tool calls in the thinker's own (Qwen2.5) convention, kept out of the caller's ears.

The node's tools are described to the thinker as JSON in its system text; it answers a call as

    <tool_call>
    {"name": "lookup_order", "arguments": {"order_id": "A17"}}
    </tool_call>

and reads the result back as a `<tool_response>` turn. `ToolCallFilter` sits between the thinker
and the backbone (a `TokenFilter`): a call's tokens are held back, never spoken, and parsed.

The filter works on decoded text, not on token ids: a tag may be split across tokens (always, with
the tiny preset's byte tokens), so the text that could still be the start of `<tool_call>` is held
back until the next token settles it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from .generation import ThinkerToken, TokenFilter

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    """One call the thinker asked for, parsed from its held-back span."""

    name: str
    arguments: dict[str, Any]
    call_id: str = field(default_factory=lambda: f"chroma-{uuid.uuid4().hex[:12]}")


def tool_descriptions(tools: Any) -> list[dict[str, Any]]:
    """A pipecat `ToolsSchema` (or a list of its `FunctionSchema`s, or plain dicts) as JSON-able
    function descriptions: name, description, parameters."""
    functions = getattr(tools, "standard_tools", tools) or []
    described = []
    for function in functions:
        if isinstance(function, dict):
            described.append(function)
        else:
            described.append(function.to_default_dict())
    return described


def tools_system_text(tools: Any) -> str:
    """The part of the system text that tells the thinker which tools it has and how to call one."""
    described = tool_descriptions(tools)
    if not described:
        return ""
    listing = "\n".join(
        json.dumps({"type": "function", "function": d}, ensure_ascii=False) for d in described
    )
    return (
        "# Tools\n\n"
        "You can call the functions described below when the caller needs something only they can do.\n"
        f"<tools>\n{listing}\n</tools>\n\n"
        "To call one, write only this, with the function's name and a JSON object of arguments:\n"
        f'{CALL_OPEN}\n{{"name": "<function name>", "arguments": {{...}}}}\n{CALL_CLOSE}\n'
        "The result comes back to you in a <tool_response> message; then answer the caller from it. "
        "Never read a tool call or its result aloud."
    )


def tool_call_text(name: str, arguments: dict[str, Any]) -> str:
    """A call written as the thinker writes one (the scripted reasoner and tests use it)."""
    return f"{CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CALL_CLOSE}"


def tool_response_text(result: Any) -> str:
    """The body of the user-side turn that gives a result back to the thinker."""
    body = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)
    return f"<tool_response>\n{body}\n</tool_response>"


def parse_call(body: str) -> ToolCall | None:
    """The JSON between the tags as a call; None (logged) when it is not one."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        logger.warning(f"thinker wrote a tool call that is not JSON ({exc}); dropped: {body[:200]!r}")
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        logger.warning(f"thinker wrote a tool call without a name; dropped: {body[:200]!r}")
        return None
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):  # some Qwen checkpoints write the arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            arguments = None
    if not isinstance(arguments, dict):
        logger.warning(f"tool call {data['name']}: arguments are not a JSON object; dropped: {body[:200]!r}")
        return None
    return ToolCall(data["name"], arguments)


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolCallFilter(TokenFilter):
    """Holds `<tool_call>...</tool_call>` spans back from the backbone and parses them.

    `decode` turns token ids into text (the session's tokenizer). Parsed calls are appended to
    `calls` and handed to `on_call`; `call_tokens` keeps each call's raw token ids, so the thinker's
    own context can keep the call it made. A call whose JSON does not parse is logged and dropped.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        on_call: Callable[[ToolCall], None] | None = None,
        special_ids: Iterable[int] = (),
    ):
        self.decode = decode
        self.on_call = on_call
        self.special_ids = set(special_ids)  # released at once outside a call (im_end and the like)
        self.calls: list[ToolCall] = []
        self.call_tokens: list[list[int]] = []
        self._pending: list[ThinkerToken] = []  # outside a call: not yet known not to open one
        self._span: list[ThinkerToken] | None = None  # inside a call
        self._pause = False

    @property
    def inside_call(self) -> bool:
        return self._span is not None

    def push(self, token: ThinkerToken) -> list[ThinkerToken]:
        if self._span is not None:
            self._span.append(token)
            return self._close_span()
        self._pending.append(token)
        return self._release()

    def should_pause(self) -> bool:
        # The reply waits at a completed call: what the thinker says next depends on its result.
        pause, self._pause = self._pause, False
        return pause

    def finish(self) -> list[ThinkerToken]:
        if self._span is not None:
            ids = [t.token_id for t in self._span]
            logger.warning(f"thinker's reply ended inside a tool call; dropped: {self.decode(ids)[:200]!r}")
            # Special tokens (the end of the turn) still belong to the backbone's schedule.
            ends = [t for t in self._span if t.token_id in self.special_ids]
            self._span = None
            return ends
        out, self._pending = self._pending, []
        return out

    # -- text bookkeeping -----------------------------------------------------------------

    def _prefix_tokens(self, tokens: list[ThinkerToken], chars: int) -> int:
        """How many leading tokens decode to no more than `chars` characters."""
        count = 0
        for k in range(1, len(tokens) + 1):
            if len(self.decode([t.token_id for t in tokens[:k]])) <= chars:
                count = k
            else:
                break
        return count

    def _release(self) -> list[ThinkerToken]:
        text = self.decode([t.token_id for t in self._pending])
        start = text.find(CALL_OPEN)
        if start < 0:
            keep = self._prefix_tokens(self._pending, len(text) - _partial_tag(text, CALL_OPEN))
            out, self._pending = self._pending[:keep], self._pending[keep:]
            return out
        # A token that straddles the tag's start goes with the call: nothing of a call is spoken.
        keep = self._prefix_tokens(self._pending, start)
        out, self._span, self._pending = self._pending[:keep], self._pending[keep:], []
        return out + self._close_span()

    def _close_span(self) -> list[ThinkerToken]:
        text = self.decode([t.token_id for t in self._span])
        start = text.find(CALL_OPEN)
        end = text.find(CALL_CLOSE, start + len(CALL_OPEN))
        if end < 0:
            return []
        # The span ends with the token that completes the closing tag; what follows is plain text.
        stop = end + len(CALL_CLOSE)
        cut = len(self._span)
        for k in range(1, len(self._span) + 1):
            if len(self.decode([t.token_id for t in self._span[:k]])) >= stop:
                cut = k
                break
        span, rest = self._span[:cut], self._span[cut:]
        self._span = None
        call = parse_call(text[start + len(CALL_OPEN) : end].strip())
        if call is not None:
            self.calls.append(call)
            self.call_tokens.append([t.token_id for t in span])
            self._pause = True
            if self.on_call is not None:
                self.on_call(call)
        out = []
        for token in rest:
            out += self.push(token)
        return out
