"""A scripted reasoner, for tests only: the test decides what the thinker says and which tools it
calls; the model does everything else.

    reasoner = ScriptedReasoner(model.tokenizer, [
        ["Let me look that up.", Call("lookup_order", {"order_id": "A17"}),
         Say(lambda result: f"It is {result['status']}.")],      # a turn: steps in order
        ["Goodbye."],
    ])
    session = model.new_session(voice, thinker_stream=reasoner)

It replaces only the thinker's *choice* of tokens (teacher forcing): the thinker still runs forward
on every forced token, so the backbone gets real hidden states and embeddings and the decoder and
codec run as usual. A `Call` is written in the thinker's own convention, so the tool-call filter
parses it exactly as it would parse the real model's. With the tiny preset's random weights the
thinker's own tokens are noise; this is how tests get a deterministic conversation out of it.

The forced stream underneath is not only for tests: `forced_text_stream` is how a session `say`s fixed
text (a flow's `say` action) in the agent's voice, through the same model.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .generation import ThinkerStream, TokenFilter
from .tools import tool_call_text


@dataclass(frozen=True)
class Say:
    """Text to speak; a callable gets the result of the turn's last tool call (None before one)."""

    text: str | Callable[[Any], str]


@dataclass(frozen=True)
class Call:
    """A tool call the thinker makes at this point of the turn."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


Step = str | Say | Call


class ScriptedReasoner:
    """Scripted turns, one per reply, taken in order; a reply past the script says nothing.

    Called as the session calls `ThinkerStream` (the `thinker_stream` factory), it returns a stream
    that forces the next turn's tokens. A turn's reply stops at a `Call` (the session pauses there, as
    for the real thinker); once the session hands back the call's result (`tool_result`), the next
    reply continues that turn's remaining steps. `replies` keeps, per reply, the tokens it forced."""

    def __init__(self, tokenizer, turns: list[list[Step]]):
        self.tokenizer = tokenizer
        self.turns: deque[list[Step]] = deque(list(t) for t in turns)
        self.replies: list[list[int]] = []
        self.results: list[Any] = []  # every tool result handed back, in order
        self._last: ScriptedThinkerStream | None = None
        self._resume = False

    def add_turn(self, steps: list[Step]) -> None:
        self.turns.append(list(steps))

    def tool_result(self, result: Any) -> None:
        self.results.append(result)
        self._resume = True

    def __call__(self, model, cache, next_position, first_hidden, first_token, lookahead=3,
                 token_filter: TokenFilter | None = None, max_tokens: int = 1024) -> ScriptedThinkerStream:
        last = self._last
        if self._resume and last is not None and last.paused_at_call:
            steps, result = list(last.remaining_steps), self.results[-1]
        else:  # a new turn; a call that never got its result leaves the rest of its turn unsaid
            steps, result = (self.turns.popleft() if self.turns else []), None
        self._resume = False
        forced: list[int] = []
        self.replies.append(forced)
        self._last = ScriptedThinkerStream(
            model, cache, next_position, first_hidden, first_token, lookahead, token_filter, max_tokens,
            steps=steps, tokenizer=self.tokenizer, forced_log=forced, last_result=result,
        )
        return self._last


def forced_text_stream(tokenizer, text: str) -> Callable[..., ScriptedThinkerStream]:
    """A `thinker_stream` factory that makes the thinker say exactly `text` and end its turn."""
    return lambda *args, **kwargs: ScriptedThinkerStream(*args, **kwargs, steps=[text], tokenizer=tokenizer)


class ScriptedThinkerStream(ThinkerStream):
    """A `ThinkerStream` whose every token is taken from the script instead of the thinker's pick."""

    def __init__(self, *args, steps: list[Step], tokenizer, forced_log: list[int] | None = None,
                 last_result: Any = None, **kwargs):
        self._steps: deque[Step] = deque(steps)
        self._tokenizer = tokenizer
        self._queue: deque[int] = deque()
        self._last_result = last_result  # what a callable `Say` is given
        self.forced_log = forced_log if forced_log is not None else []
        super().__init__(*args, **kwargs)

    @property
    def remaining_steps(self) -> list[Step]:
        """The script's steps not yet started (after a pause at a call: the rest of the turn)."""
        return list(self._steps)

    def _next_forced(self) -> int:
        while not self._queue and self._steps:
            step = self._steps.popleft()
            if isinstance(step, Call):
                text = tool_call_text(step.name, step.arguments)
            elif isinstance(step, Say):
                text = step.text(self._last_result) if callable(step.text) else step.text
            else:
                text = str(step)
            self._queue.extend(self._tokenizer.encode(text))
        if self._queue:
            return self._queue.popleft()
        return self.model.config.im_end_token_id

    def _accept(self, hidden: torch.Tensor, token: torch.Tensor) -> None:
        forced = self._next_forced()
        self.forced_log.append(forced)
        super()._accept(hidden, torch.full_like(token, forced))
