"""One simulated call through the real pipeline, offline: `chroma-agent call` and the tests."""

from __future__ import annotations

import asyncio

import numpy as np
from loguru import logger

from processors.audio import SUPPORTED_RATES
from processors.audio_io import resample, to_float, to_pcm16
from processors.chroma.rates import SAMPLE_RATE
from transports.file import FileCallTransport

from .call import Call
from .runtime import AgentRuntime


async def simulate_call(
    runtime: AgentRuntime,
    caller_pcm: np.ndarray,
    caller_rate: int,
    *,
    out_rate: int = SAMPLE_RATE,
    settle_secs: float = 1.5,
    max_secs: float = 300.0,
) -> tuple[Call, np.ndarray, FileCallTransport]:
    """Play the caller's audio in real time and hang up once it has all been sent and the agent
    has been quiet for `settle_secs` (after the end-of-turn wait). -> (the finished call, the agent's
    audio as int16 at out_rate on the call's timeline, the transport with its event log).

    The caller's audio may be at any rate (int16 or float); one the call's resamplers do not take
    (44.1 kHz, 22.05 kHz, ...) is resampled to 16 kHz first. The call ends early if a task of it
    fails: `call.errors` says which and why."""
    if caller_rate not in SUPPORTED_RATES:
        pcm = np.asarray(caller_pcm)
        audio = to_float(pcm) if pcm.dtype == np.int16 else pcm
        caller_pcm, caller_rate = to_pcm16(resample(audio.reshape(-1), caller_rate, 16000)), 16000
    # Listen at the caller's own rate where the VAD can, as a phone transport does.
    in_rate = caller_rate if caller_rate in (8000, 16000) else 16000
    transport = FileCallTransport(caller_pcm, caller_rate, output_rate=out_rate, in_rate=in_rate)
    call = runtime.new_call(transport)
    settle = settle_secs + runtime.spec.turn.silence_secs
    service, clock = call.service, transport.clock

    async def hang_up_when_done():
        try:
            await wait_until_quiet()
        except Exception as exc:  # the call would otherwise wait for a hang-up that never comes
            call.errors.append(f"hang-up watcher: {type(exc).__name__}: {exc}")
            logger.opt(exception=exc).error(f"call {call.stats.call_id}: the hang-up watcher failed; ending the call")
            await call.cancel(reason="the hang-up watcher failed")
            return
        await call.hang_up()

    async def wait_until_quiet():
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

    watcher = asyncio.create_task(hang_up_when_done())
    try:
        await call.run()
    finally:
        watcher.cancel()
    return call, transport.recording(duration=clock.now()), transport
