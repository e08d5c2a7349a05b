"""A call's side of a flow's telephony actions (`flows.actions.CallControl`), on the call's pipeline.

Each action is queued at the top of the pipeline as a `CallActionFrame`, so it takes its turn after
the replies asked for before it: a node's `say` follows the reply before it, and hang-up, transfer
and DTMF wait until the audio before them has been played out at the caller's end. The engine
service carries it out (processors/chroma/service.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.frames.frames import OutputDTMFUrgentFrame

from processors.audio_io import read_audio, to_pcm16
from processors.chroma.service import CallActionFrame

if TYPE_CHECKING:
    from .call import Call


class PipelineCallControl:
    """What a flow can ask of one running call. Methods return once the request is queued."""

    def __init__(self, call: Call):
        self.call = call

    async def _queue(self, frame: CallActionFrame) -> None:
        await self.call.worker.queue_frame(frame)

    async def hang_up(self, after_current_sentence: bool = True) -> None:
        if after_current_sentence:
            await self._queue(CallActionFrame(when_quiet=self._end))
        else:
            await self.call.hang_up()

    async def _end(self) -> None:
        self.call.ended_by_agent = True
        self.call.note("agent_hung_up")
        await self.call.service.end_call()

    async def transfer(self, target: str) -> None:
        async def transfer_now() -> None:
            line = self.call.line
            if not line.can_transfer:
                reason = f"a {self.call.stats.kind} call cannot be transferred"
            elif not await line.transfer(target):
                reason = "the transfer was not accepted"
            else:
                self.call.transferred_to = target
                self.call.note("transferred", to=target)
                logger.info(f"call {self.call.stats.call_id}: transferred to {target}")
                await self._end()
                return
            self.call.note("transfer_failed", to=target, reason=reason)
            logger.error(f"call {self.call.stats.call_id}: not transferred to {target}: {reason}; staying on")

        await self._queue(CallActionFrame(when_quiet=transfer_now))

    async def send_dtmf(self, digits: str) -> None:
        async def send() -> None:
            for digit in digits:
                await self.call.service.push_frame(OutputDTMFUrgentFrame(button=KeypadEntry(digit.upper())))
            self.call.dtmf_sent.append(digits)
            self.call.note("dtmf_sent", digits=digits)

        await self._queue(CallActionFrame(when_quiet=send))

    async def play(self, wav_path: Path) -> None:
        # At the call's output rate: the file may be at any rate, the service's resampler takes a few.
        rate = self.call.service.out_rate
        pcm = to_pcm16(read_audio(wav_path, rate)).tobytes()
        await self._queue(CallActionFrame(audio=pcm, rate=rate))

    async def say(self, text: str) -> None:
        await self._queue(CallActionFrame(say=text))

    async def set_voice(self, name: str) -> None:
        await self.call.set_voice(name)
