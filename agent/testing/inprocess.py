"""A call to the agent inside this process, driven by a caller: the in-process transport of
conversation tests (and the whole-flow tests).

    async with InProcessCall(runtime) as line:
        await line.say(pcm)                   # int16 at line.rate, sent in real time
        first = await line.agent_audio_after(t)  # call seconds of the first agent audio after t
        await line.press("1234#")
        await line.quiet()                    # the agent has answered and gone quiet
    line.call                                 # the finished call: tool calls, nodes, DTMF, transfer

The real pipeline runs (VAD, end of turn, the engine service, playout tracking) on the file
transport, whose clock is the call's: "call seconds" below are seconds since the call started.
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np

from transports.file import FileCallTransport

from ..call import Call
from ..runtime import AgentRuntime


class InProcessCall:
    def __init__(
        self, runtime: AgentRuntime, *, rate: int = 16000, out_rate: int = 16000, max_secs: float = 300.0
    ):
        self.rate = rate
        self.transport = FileCallTransport(
            np.zeros(0, np.int16),
            rate,
            output_rate=out_rate,
            in_rate=rate if rate in (8000, 16000) else 16000,
            kind="inprocess",
        )
        self.call: Call = runtime.new_call(self.transport)
        self.max_secs = max_secs
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> InProcessCall:
        self._task = asyncio.create_task(self.call.run())
        while self.transport.clock.t0 is None and not self._task.done():
            await asyncio.sleep(0.01)  # the caller's clock starts with the first frame sent
        return self

    async def __aexit__(self, *exc) -> None:
        await self.hang_up()

    @property
    def now(self) -> float:
        return self.transport.clock.now()

    @property
    def ended(self) -> bool:
        return self._task is not None and self._task.done()

    @property
    def agent_busy(self) -> bool:
        """Something is in flight: caller audio unsent, a turn open, a reply generating or playing."""
        service = self.call.service
        return (
            self.transport.caller_busy
            or service.hearing
            or service.speaking
            or self.transport.cursor > self.now
        )

    async def say(self, pcm: np.ndarray) -> tuple[float, float]:
        """Play the caller's audio; returns once it has all been sent, with its (start, end) call seconds."""
        start = self.transport.play(pcm)
        end = start + len(pcm) / self.rate
        await self._until(lambda: self.now >= end or self.ended, end - self.now + 5)
        return start, end

    async def press(self, digits: str, gap_secs: float = 0.15) -> None:
        for digit in digits:
            await self.transport.press(digit)
            await asyncio.sleep(gap_secs)

    async def wait(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def quiet(self, settle: float = 1.0, timeout: float = 60.0) -> bool:
        """Wait until nothing has been in flight for `settle` seconds (or the call ended). False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        quiet_since = None
        while loop.time() < deadline and not self.ended:
            if self.agent_busy:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = loop.time()
            elif loop.time() - quiet_since >= settle:
                return True
            await asyncio.sleep(0.05)
        return self.ended

    def agent_audio(self, after: float = 0.0) -> list[float]:
        """Call seconds at which agent audio chunks started playing, after `after`."""
        return [e[1] for e in self.transport.events if e[0] == "agent_audio" and e[1] > after]

    async def agent_audio_after(self, t: float, timeout: float = 30.0) -> float | None:
        """The first agent audio after call second `t`, waiting up to `timeout`; None if none came."""
        found: list[float] = []

        def seen() -> bool:
            found[:] = self.agent_audio(t)
            return bool(found) or self.ended

        await self._until(seen, timeout)
        return found[0] if found else None

    async def hang_up(self, timeout: float = 10.0) -> None:
        """The caller hangs up (if the agent has not already), and the call's pipeline is waited for."""
        if self._task is None:
            return
        if not self._task.done():
            await self.call.hang_up()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
        if not self._task.done():
            await self.call.cancel("the caller's hang-up did not end the call in time")
        await asyncio.gather(self._task, return_exceptions=True)

    async def _until(self, condition, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while not condition():
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True
