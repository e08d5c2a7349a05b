"""What the caller actually heard: counts agent audio as the output transport writes it and, on
barge-in, tells the speech service upstream how much of the cut reply was played."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipecat.frames.frames import (
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    SystemFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor


@dataclass
class AudioPlayedFrame(SystemFrame):
    """Upstream report: `seconds` of the current reply had left the output when it was cut."""

    seconds: float


class PlayoutTracker(FrameProcessor):
    """Sits right after the output transport, which pushes each audio chunk on once written.

    TTSStartedFrame travels in order with the audio, so the count restarts exactly where a reply's
    audio begins. InterruptionFrame arrives after the transport has dropped its queue.

    `unplayed`: for a transport that sends ahead of playback (Twilio queues audio at its end), a callable
    giving the seconds written but not yet played when the barge-in came; they are not counted."""

    def __init__(self, unplayed: Callable[[], float] | None = None, **kwargs):
        super().__init__(**kwargs)
        self._unplayed = unplayed
        self._played = 0.0
        self._speaking = False

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            if isinstance(frame, TTSStartedFrame):
                self._played, self._speaking = 0.0, True
            elif isinstance(frame, OutputAudioRawFrame) and self._speaking:
                self._played += len(frame.audio) / (2 * frame.num_channels * frame.sample_rate)
            elif isinstance(frame, TTSStoppedFrame):
                self._speaking = False
            elif isinstance(frame, InterruptionFrame) and self._speaking:
                self._speaking = False
                played = self._played - (self._unplayed() if self._unplayed else 0.0)
                await self.push_frame(AudioPlayedFrame(seconds=max(0.0, played)), FrameDirection.UPSTREAM)
        await self.push_frame(frame, direction)
