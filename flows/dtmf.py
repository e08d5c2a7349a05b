"""Collecting keypad digits at a node, and routing on them.

    collect_dtmf:
      max_digits: 6            # stop after this many
      terminator: "#"          # or stop at this key (not part of the digits)
      timeout_secs: 5          # or stop this long after the last key (or the node's start)
      store_as: account        # the digits go into state: {{ account }}
      routes: {"1": orders, "2": billing}
      default: check_account   # digits that match no route
      on_timeout: main_menu    # no digits at all before the timeout
      sensitive: true          # card numbers, PINs: call records keep "*" for each key

Without a route, default or on_timeout for what was entered, the node keeps listening.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from loguru import logger
from pipecat.frames.frames import Frame, InputDTMFFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr, field_validator

KEYS = re.compile(r"^[0-9*#A-D]+$")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class DtmfSpec(BaseModel):
    """How a node collects digits from the caller's keypad."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_digits: StrictInt = Field(1, ge=1, le=32, description="Stop after this many digits.")
    terminator: Literal["#", "*"] | None = Field("#", description="Key that ends the entry early.")
    timeout_secs: Annotated[float, Strict()] = Field(
        5.0, ge=0.5, le=60, description="Silence on the keypad that ends the entry."
    )
    store_as: StrictStr | None = Field(None, description="State key that receives the digits.")
    routes: dict[StrictStr, StrictStr] = Field(default_factory=dict, description="Digits to node.")
    default: StrictStr | None = Field(None, description="Node for digits that match no route.")
    on_timeout: StrictStr | None = Field(None, description="Node when nothing was entered in time.")
    sensitive: StrictBool = Field(
        False, description="Card numbers, PINs: records keep '*' for each key and recordings mute the caller."
    )

    @field_validator("store_as")
    @classmethod
    def _identifier(cls, value: str | None) -> str | None:
        if value is not None and not IDENTIFIER.match(value):
            raise ValueError("a name made of letters, digits and _, not starting with a digit")
        return value

    @field_validator("routes", mode="before")
    @classmethod
    def _digit_keys(cls, value: Any) -> Any:
        # YAML reads `1: orders` with an integer key; the caller's keypad gives text.
        return (
            {str(k) if isinstance(k, int) and not isinstance(k, bool) else k: v for k, v in value.items()}
            if isinstance(value, dict)
            else value
        )

    def route_problems(self) -> list[tuple[tuple, str]]:
        """Route keys that no caller could enter under these settings."""
        problems = []
        for digits in self.routes:
            if not KEYS.match(digits):
                problems.append(
                    (("routes", digits), f"{digits!r} is not a key sequence; expected 0-9, *, #, A-D")
                )
            elif self.terminator and self.terminator in digits:
                problems.append(
                    (
                        ("routes", digits),
                        f"{digits!r} holds the terminator {self.terminator!r}, which ends the entry",
                    )
                )
            elif len(digits) > self.max_digits:
                problems.append(
                    (("routes", digits), f"{digits!r} is longer than max_digits {self.max_digits}")
                )
        return problems

    def targets(self) -> list[tuple[tuple, str]]:
        """Every node this can route to, with where it is named."""
        named = [(("routes", k), v) for k, v in self.routes.items()]
        named += [((key,), getattr(self, key)) for key in ("default", "on_timeout") if getattr(self, key)]
        return named


Route = Callable[[str], Awaitable[None]]


class DigitCollector:
    """Collects one entry of digits for the node that asked for it, then routes.

    `go(node_name)` is how it moves the flow (the call's FlowManager transition); `state` is the flow's
    state, where `store_as` puts the digits.
    """

    def __init__(self, go: Route, state: Callable[[], dict[str, Any]]):
        self._go = go
        self._state = state
        self._spec: DtmfSpec | None = None
        self._digits = ""
        self._timer: asyncio.TimerHandle | None = None
        self._routing: asyncio.Task | None = None

    @property
    def listening(self) -> bool:
        return self._spec is not None

    def listen(self, spec: DtmfSpec | None) -> None:
        """Start a fresh entry under `spec`, or stop listening (None): entering a node calls this."""
        self._cancel_timer()
        self._spec, self._digits = spec, ""
        if spec is not None:
            self._start_timer()

    async def press(self, key: str) -> None:
        """One key from the caller's keypad."""
        spec = self._spec
        if spec is None:
            return
        if spec.terminator and key == spec.terminator:
            await self._finish()
            return
        self._digits += key
        if len(self._digits) >= spec.max_digits:
            await self._finish()
        else:
            self._start_timer()

    async def _finish(self) -> None:
        spec, digits = self._spec, self._digits
        self.listen(None)
        if spec is None:
            return
        if digits and spec.store_as:
            self._state()[spec.store_as] = digits
        target = spec.routes.get(digits, spec.default) if digits else spec.on_timeout
        if target is None:
            logger.debug(f"DTMF {digits!r} matches no route; listening again")
            self.listen(spec)
            return
        await self._go(target)

    def _start_timer(self) -> None:
        self._cancel_timer()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._spec.timeout_secs, self._on_timeout)

    def _on_timeout(self) -> None:
        self._timer = None
        if self._spec is not None and (self._digits or self._spec.on_timeout):
            self._routing = asyncio.get_running_loop().create_task(self._finish())

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class DTMFInput(FrameProcessor):
    """Feeds the caller's keypad presses (`InputDTMFFrame`) to a flow's digit collector; put it after
    the transport's input. Frames pass through unchanged."""

    def __init__(self, collector: DigitCollector, **kwargs):
        super().__init__(**kwargs)
        self._collector = collector

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, InputDTMFFrame):
            await self._collector.press(frame.button.value)
        await self.push_frame(frame, direction)
