"""The called end of an outbound call: baresip answering as a scripted callee, and the conversation-test
line ("sip-outbound") on which the agent places the call and the scenario's turns are the callee's.

    phone, uri = await answering_phone(folder)   # baresip, answering calls to sip:callee@127.0.0.1:PORT
    line = OutboundSipLine(runtime)        # as LINES["sip-outbound"]
    await line.open()                      # the agent dials the callee; returns once it answered
    await line.say(hello)                  # the callee speaks first, as people answering do

The agent waits for the callee's greeting and tells a person from an answering machine before it
answers (agent/outbound.py); a scenario on this line starts with what the callee says.
"""

from __future__ import annotations

import asyncio
import re
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

from .baresip import RATE, SILENCE_SECS, Baresip, configure, launch, write_pcm
from .lines import LINES, SipLine

ANSWER_TIMEOUT_SECS = 20.0


async def answering_phone(folder: Path) -> tuple[Baresip, str]:
    """baresip in `folder`, answering the first call to it at once; (the phone, the URI to dial)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        ctrl_port = sock.getsockname()[1]
    silence = write_pcm(folder / "silence.wav", np.zeros(RATE * SILENCE_SECS, np.int16))
    config = await asyncio.to_thread(configure, folder, silence, ctrl_port=ctrl_port)
    (config / "accounts").write_text("<sip:callee@127.0.0.1>;regint=0;answermode=auto;audio_codecs=PCMU\n")
    listen = re.search(r"^sip_listen\s+127\.0\.0\.1:(\d+)", (config / "config").read_text(), re.M)
    if listen is None:
        raise RuntimeError(f"{config / 'config'}: no sip_listen address for the callee")
    process, reader, writer = await launch(folder, config, ctrl_port)
    return Baresip(folder, silence, process, reader, writer), f"sip:callee@127.0.0.1:{listen.group(1)}"


class OutboundSipLine(SipLine):
    """The agent calls: it places the call over SIP (agent.outbound.place_call) to baresip, which
    answers; the scenario's turns are what the callee says. `placed` is the placed call, its outcome and
    who answered."""

    transport = "sip-outbound"

    def __init__(self, runtime):
        super().__init__(runtime)
        self.placed = None

    async def open(self) -> None:
        from ..outbound import place_call, placed_call

        self._folder = Path(tempfile.mkdtemp(prefix="chroma-sip-callee-"))
        self._phone, uri = await answering_phone(self._folder)
        self.t0 = time.monotonic()
        self.placed = placed_call(self.runtime, await place_call(self.runtime, uri))
        deadline = time.monotonic() + ANSWER_TIMEOUT_SECS
        while self.placed.call is None and not self.placed.done and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.placed.call is None:
            raise RuntimeError(
                f"the agent's call to {uri} was not answered: {self.placed.outcome or 'no answer'} "
                f"{self.placed.detail} ({Baresip._log_tail(self._folder)})"
            )
        self.call = self.placed.call

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            if self.placed is not None:
                await self.placed.wait(10.0)


LINES[OutboundSipLine.transport] = OutboundSipLine
