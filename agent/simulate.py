"""One simulated call through the real pipeline, offline: `chroma-agent call` and the tests."""

from __future__ import annotations

import asyncio

import numpy as np

from transports.file import FileCallTransport

from .runtime import AgentRuntime, Call


async def simulate_call(
    runtime: AgentRuntime,
    caller_pcm: np.ndarray,
    caller_rate: int,
    *,
    out_rate: int = 24000,
    settle_secs: float = 1.5,
    max_secs: float = 300.0,
) -> tuple[Call, np.ndarray, FileCallTransport]:
    """Play the caller's audio in real time and hang up once it has all been sent and the agent
    has been quiet for `settle_secs` (after the end-of-turn wait). -> (the finished call, the agent's
    audio as int16 at out_rate on the call's timeline, the transport with its event log)."""
    transport = FileCallTransport(caller_pcm, caller_rate, output_rate=out_rate)
    # Listen at the caller's own rate where the VAD can, as a phone transport does.
    in_rate = caller_rate if caller_rate in (8000, 16000) else 16000
    call = runtime.new_call(transport, kind="file", out_rate=out_rate, in_rate=in_rate)
    settle = settle_secs + runtime.spec.turn.silence_secs
    service, clock = call.service, transport.clock

    async def hang_up_when_done():
        await transport.caller_done.wait()
        quiet_since = None
        while clock.now() < max_secs:
            busy = service.speaking or service.hearing or transport.cursor > clock.now()
            if busy:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = clock.now()
            elif clock.now() - quiet_since >= settle:
                break
            await asyncio.sleep(0.05)
        await call.hang_up()

    watcher = asyncio.create_task(hang_up_when_done())
    try:
        await call.run()
    finally:
        watcher.cancel()
    return call, transport.recording(duration=clock.now()), transport
