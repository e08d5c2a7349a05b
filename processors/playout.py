"""What the caller actually heard: counts agent audio as the output transport writes it and, on
barge-in, tells the speech service upstream how much of the cut reply was played. A `PlayedOutFrame`
sent down behind a reply's audio says when that audio has been played out."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pipecat.frames.frames import (
    ControlFrame,
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


@dataclass
class PlayedOutFrame(ControlFrame):
    """Downstream marker: `reached` is set once the audio pushed before it has been played out.

    The output transport passes a non-system frame on only after writing the audio queued before it;
    where the transport plays ahead of the caller (Twilio), its `wait_played` covers the rest. A
    barge-in drops the marker with the audio, so whoever waits on it must also stop on a barge-in."""

    reached: asyncio.Event = field(default_factory=asyncio.Event)


class PlayoutTracker(FrameProcessor):
    """Sits right after the output transport, which pushes each audio chunk on once written.

    TTSStartedFrame travels in order with the audio, so the count restarts exactly where a reply's
    audio begins. InterruptionFrame arrives after the transport has dropped its queue.

    `unplayed`: for a transport that sends ahead of playback (Twilio queues audio at its end), a callable
    giving the seconds written but not yet played when the barge-in came; they are not counted.
    `wait_played`: for the same kind of transport, returns once everything written has been played."""

    def __init__(
        self,
        unplayed: Callable[[], float] | None = None,
        wait_played: Callable[[], Awaitable[None]] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._unplayed = unplayed
        self._wait_played = wait_played
        self._played = 0.0
        self._speaking = False

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            if isinstance(frame, PlayedOutFrame):
                if self._wait_played is None:
                    frame.reached.set()
                else:
                    self.create_task(self._played_out(frame), "played-out")
                return  # the marker's journey ends here
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

    async def _played_out(self, frame: PlayedOutFrame) -> None:
        await self._wait_played()
        frame.reached.set()


def with_playout(transport) -> list[FrameProcessor]:
    """`transport.output()` followed by the `PlayoutTracker` fed by it, for a pipeline's list:

        Pipeline([transport.input(), user_aggregator, chroma, *with_playout(transport), assistant_aggregator])

    With it, a reply the caller barges in on is cut in the conversation to what the caller heard, and
    a flow's hang-up or transfer waits until the goodbye has been played out. A transport that sends
    audio ahead of playback (Twilio's) says how much is still unplayed; others play as they write."""
    output = transport.output()
    return [
        output,
        PlayoutTracker(
            unplayed=getattr(output, "unplayed_seconds", None),
            wait_played=getattr(output, "wait_played", None),
        ),
    ]
