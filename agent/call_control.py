"""A flow's telephony actions carried out on one running call (`flows.actions.CallControl`).

    control = PipelineCallControl(call)      # agent.runtime.Call: its pipeline, transport, service
    await control.transfer("+15551234567")   # through the transport, when it can transfer

Every method returns once the request is on its way (a frame queued, a transfer asked for), not
when the caller has heard it.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
from loguru import logger
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.frames.frames import OutputAudioRawFrame, OutputDTMFUrgentFrame

from processors.audio import StreamResampler

PLAY_CHUNK_SECS = 0.02


class TransferNotSupported(RuntimeError):
    """The call's transport has no way to hand the caller on (a browser call, a file call)."""


class PipelineCallControl:
    def __init__(self, call):
        self.call = call

    async def hang_up(self, after_current_sentence: bool = True) -> None:
        if after_current_sentence:
            # EndFrame travels behind the reply being generated; the service lets that reply finish.
            await self.call.hang_up()
        else:
            await self.call.cancel("the flow hung up")

    async def transfer(self, target: str) -> None:
        transfer = getattr(self.call.transport, "transfer", None)
        if transfer is None:
            raise TransferNotSupported(f"a {self.call.stats.kind} call cannot be transferred (to {target})")
        accepted = await transfer(target)
        if accepted is False:
            raise RuntimeError(f"the transport refused the transfer to {target}")
        logger.info(f"call {self.call.stats.call_id}: transferred to {target}")

    async def send_dtmf(self, digits: str) -> None:
        keys = {k.value for k in KeypadEntry}
        unsupported = [d for d in digits.upper() if d not in keys]
        if unsupported:
            raise ValueError(f"DTMF {''.join(unsupported)!r} cannot be sent by pipecat's transports (0-9, *, #)")
        await self.call.worker.queue_frame(OutputDTMFUrgentFrame.from_string(digits))

    async def play(self, wav_path: Path) -> None:
        pcm, rate = read_wav(wav_path)
        out_rate = self.call.service.out_rate
        if rate != out_rate:
            resampler = StreamResampler(rate, out_rate)
            pcm = np.frombuffer(resampler.process(pcm.tobytes()) + resampler.flush(), np.int16)
        step = int(out_rate * PLAY_CHUNK_SECS)
        frames = [
            OutputAudioRawFrame(audio=pcm[i : i + step].tobytes(), sample_rate=out_rate, num_channels=1)
            for i in range(0, pcm.size, step)
        ]
        await self.call.worker.queue_frames(frames)

    async def say(self, text: str) -> None:
        await self.call.service.say(text)

    async def set_voice(self, name: str) -> None:
        await self.call.set_voice(name)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """A PCM WAV file as mono int16 samples and its rate."""
    with wave.open(str(path), "rb") as w:
        rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
        raw = w.readframes(w.getnframes())
    if width == 2:
        samples = np.frombuffer(raw, np.int16).astype(np.float32)
    elif width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) * 256.0
    elif width == 4:
        samples = np.frombuffer(raw, np.int32).astype(np.float32) / 65536.0
    else:
        raise ValueError(f"{path}: {8 * width}-bit WAV is not supported (8, 16 or 32-bit PCM)")
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(1)
    return np.clip(samples, -32768, 32767).astype(np.int16), rate
