"""Graceful drain: a server that is going away stops taking calls and lets the live ones finish.

    drain = Drain(runtime, sip=sip_server)
    await drain.run()         # returns once no call is left; the server may then exit

From the moment it starts, every new call is refused as busy ("draining": SIP INVITE and OPTIONS 503,
the Twilio webhook 503, the WebRTC offer 503, /readyz 503), so the front doors (Kamailio's dispatcher,
an HTTP load balancer) send calls elsewhere. Live calls go on for up to the agent's `drain_seconds`;
those still live then hear a short goodbye and are hung up (SIP BYE, the Twilio stream closed, the
WebRTC peer closed). The goodbye is spoken through the model in the agent's voice once, while the
calls finish, and played to each call left; a call that will not end even then is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol

from loguru import logger

from processors.chroma.config import SAMPLE_RATE
from processors.chroma.service import CallActionFrame

from .call_control import PipelineCallControl
from .runtime import AgentRuntime

GOODBYE = "I'm sorry, this line is closing now. Please call again. Goodbye."
GOODBYE_SECS = 10.0  # the goodbye's time to be said and the call to end before it is cancelled
RENDER_SECS = 10.0  # the longest the limit waits on the goodbye's rendering; then it is said live
CANCEL_SECS = 5.0  # cancelled calls' time to unwind
PROGRESS_EVERY_SECS = 5.0
POLL_SECS = 0.1


class Drainable(Protocol):
    """A transport's server that refuses new calls in its own way once told (SipServer)."""

    def drain(self) -> None: ...


class Drain:
    """One drain of one server; `run` once."""

    def __init__(
        self,
        runtime: AgentRuntime,
        *,
        seconds: float | None = None,
        transports: list[Drainable] | tuple[Drainable, ...] = (),
        goodbye: str = GOODBYE,
    ):
        self.runtime = runtime
        self.seconds = runtime.spec.drain_seconds if seconds is None else seconds
        self.transports = transports
        self.goodbye = goodbye
        self.started: float | None = None
        self.ended_politely = 0  # calls that were still live at the limit and heard the goodbye
        self.cancelled = 0  # calls that would not end even after the goodbye
        self.done = asyncio.Event()
        self._goodbye_audio: asyncio.Task | None = None

    @property
    def left(self) -> int:
        """Calls still here: running, or answered and about to run."""
        return self.runtime.sessions

    async def run(self) -> None:
        if self.started is not None:
            await self.done.wait()
            return
        self.started = time.monotonic()
        self.runtime.draining = True
        for transport in self.transports:
            transport.drain()
        logger.warning(
            f"draining: taking no new calls; {self.left} live call(s) may go on for up to {self.seconds:g} s"
        )
        if self.left:
            self._goodbye_audio = asyncio.get_running_loop().create_task(self.runtime.render_line(self.goodbye))
        try:
            if not await self._wait_calls(self.seconds, "draining"):
                await self._end_the_rest()
            logger.info(f"drained in {time.monotonic() - self.started:.1f} s")
        finally:
            if self._goodbye_audio is not None:
                self._goodbye_audio.cancel()
            self.done.set()

    async def _wait_calls(self, seconds: float, doing: str) -> bool:
        """True once no call is left; False when `seconds` pass first. Logs the count every few seconds."""
        deadline = time.monotonic() + seconds
        next_log = time.monotonic() + PROGRESS_EVERY_SECS
        while self.left:
            now = time.monotonic()
            if now >= deadline:
                return False
            if now >= next_log:
                logger.info(f"{doing}: {self.left} call(s) left, {deadline - now:.0f} s to go")
                next_log = now + PROGRESS_EVERY_SECS
            await asyncio.sleep(POLL_SECS)
        return True

    async def _end_the_rest(self) -> None:
        audio = None
        if self._goodbye_audio is not None:
            with contextlib.suppress(Exception):
                audio = await asyncio.wait_for(asyncio.shield(self._goodbye_audio), RENDER_SECS)
        calls = list(self.runtime.calls.values())
        logger.warning(f"drain limit of {self.seconds:g} s reached: saying goodbye on {len(calls)} call(s)")
        for call in calls:
            self.ended_politely += 1
            control = PipelineCallControl(call)
            try:
                # Queued behind the reply under way, if any; the hang-up waits until the goodbye is heard.
                if audio:
                    await call.worker.queue_frame(CallActionFrame(audio=audio, rate=SAMPLE_RATE))
                else:
                    await control.say(self.goodbye)
                await control.hang_up(after_current_sentence=True)
            except Exception:
                logger.exception(f"call {call.stats.call_id}: could not queue the goodbye; cancelling it")
                with contextlib.suppress(Exception):
                    await call.cancel("server draining")
        if await self._wait_calls(GOODBYE_SECS, "saying goodbye"):
            return
        stuck = list(self.runtime.calls.values())
        self.cancelled = len(stuck)
        logger.warning(f"{len(stuck)} call(s) still live {GOODBYE_SECS:g} s after the goodbye; cancelling them")
        for call in stuck:
            with contextlib.suppress(Exception):
                await call.cancel("server draining")
        await self._wait_calls(CANCEL_SECS, "cancelling")
