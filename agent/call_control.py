"""A call's side of a flow's telephony actions (`flows.actions.CallControl`), on the call's pipeline.

Each action is queued at the top of the pipeline as a `CallActionFrame`, so it takes its turn after
the replies asked for before it: a node's `say` follows the reply before it, and `end_call` waits for
the goodbye. The engine service carries it out (processors/chroma/service.py).
"""

from __future__ import annotations

import wave
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from loguru import logger
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.frames.frames import OutputDTMFUrgentFrame

from processors.chroma.service import CallActionFrame

if TYPE_CHECKING:
    from .runtime import Call


def read_wav(path: Path) -> tuple[bytes, int]:
    """A PCM WAV as 16-bit mono bytes and its rate (channels mixed down)."""
    with wave.open(str(path), "rb") as w:
        rate, channels, width, frames = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
        raw = w.readframes(frames)
    if width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.int16) - 128) << 8
    elif width == 2:
        samples = np.frombuffer(raw, np.int16)
    elif width == 4:
        samples = (np.frombuffer(raw, np.int32) >> 16).astype(np.int16)
    else:
        raise ValueError(f"{path}: {8 * width}-bit samples; expected 8, 16 or 32-bit PCM")
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1).astype(np.int16)
    return samples.tobytes(), rate


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
        await self.call.service.end_call()

    async def transfer(self, target: str) -> None:
        async def transfer_now() -> None:
            transfer = getattr(self.call.transport, "transfer", None)
            if transfer is None:
                logger.error(f"call {self.call.stats.call_id}: its transport cannot transfer; {target} not dialled")
                return
            if await transfer(target):
                self.call.transferred_to = target
                logger.info(f"call {self.call.stats.call_id}: transferred to {target}")
                await self._end()
            else:
                logger.error(f"call {self.call.stats.call_id}: transfer to {target} was not accepted; staying on")

        await self._queue(CallActionFrame(when_quiet=transfer_now))

    async def send_dtmf(self, digits: str) -> None:
        async def send() -> None:
            for digit in digits:
                await self.call.service.push_frame(OutputDTMFUrgentFrame(button=KeypadEntry(digit.upper())))
            self.call.dtmf_sent.append(digits)

        await self._queue(CallActionFrame(when_quiet=send))

    async def play(self, wav_path: Path) -> None:
        pcm, rate = read_wav(wav_path)
        await self._queue(CallActionFrame(audio=pcm, rate=rate))

    async def say(self, text: str) -> None:
        await self._queue(CallActionFrame(say=text))

    async def set_voice(self, name: str) -> None:
        await self.call.set_voice(name)
