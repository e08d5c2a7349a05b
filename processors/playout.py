"""What the caller actually heard, one account per call (`CallPlayout`): fed by the audio the line's
output writes and by the line's own `Playout` (what its far end has not played), read by the speech
service (how much of a cut reply was heard, when queued audio has played out), by call actions and by
the records. `PlayoutTracker`, right after the output transport, feeds it from the pipeline."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from pipecat.frames.frames import (
    ControlFrame,
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    StartFrame,
    SystemFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from transports.line import PLAYS_AS_WRITTEN, Playout


class CallPlayout:
    """One call's account of the agent audio the caller has heard.

    The output side reports each reply's start and end and every chunk written to the line; the line
    says how much of what was written its far end had not played when a barge-in cleared it
    (`unplayed_seconds`) and when everything written has played (`wait_played`)."""

    def __init__(self, line: Playout):
        self.line = line
        self.written_seconds = 0.0  # agent audio written to the line since the call began
        self._reply_from: float | None = None  # written_seconds when the current reply began; None between

    # -- fed by the output side --

    def reply_started(self) -> None:
        self._reply_from = self.written_seconds

    def wrote(self, seconds: float) -> None:
        self.written_seconds += seconds

    def reply_ended(self) -> None:
        self._reply_from = None

    def cut(self) -> float | None:
        """A barge-in: seconds of the current reply the caller heard (written, less what the line had
        not played); None when no reply was under way."""
        if self._reply_from is None:
            return None
        written, self._reply_from = self.written_seconds - self._reply_from, None
        return max(0.0, written - self.line.unplayed_seconds())

    # -- read --

    def unplayed_seconds(self) -> float:
        """Seconds written and dropped unplayed at the last barge-in."""
        return self.line.unplayed_seconds()

    async def wait_played(self) -> None:
        """Returns once everything written so far has been played at the far end (bounded by the line)."""
        await self.line.wait_played()


@dataclass
class PlayoutFrame(SystemFrame):
    """Upstream, once at the start: the call's account, for the speech service to read."""

    playout: CallPlayout


@dataclass
class AudioPlayedFrame(SystemFrame):
    """Upstream report: `seconds` of the current reply had been played when it was cut."""

    seconds: float


@dataclass
class PlayedOutFrame(ControlFrame):
    """Downstream marker: `reached` is set once the audio pushed before it has been played out.

    The output transport passes a non-system frame on only after writing the audio queued before it;
    the line's `wait_played` covers what it plays after writing. A barge-in drops the marker with the
    audio, so whoever waits on it must also stop on a barge-in."""

    reached: asyncio.Event = field(default_factory=asyncio.Event)


class PlayoutTracker(FrameProcessor):
    """Sits right after the output transport, which pushes each audio chunk on once written, and feeds
    the call's `playout` account from what passes.

    TTSStartedFrame travels in order with the audio, so a reply's count starts exactly where its audio
    begins. InterruptionFrame arrives after the transport has dropped its queue (and the line has
    counted what it cleared unplayed); the cut reply's heard seconds then go upstream."""

    def __init__(self, line: Playout, **kwargs):
        super().__init__(**kwargs)
        self.playout = CallPlayout(line)

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            playout = self.playout
            if isinstance(frame, PlayedOutFrame):
                self.create_task(self._played_out(frame), "played-out")
                return  # the marker's journey ends here
            if isinstance(frame, StartFrame):
                await self.push_frame(frame, direction)
                await self.push_frame(PlayoutFrame(playout), FrameDirection.UPSTREAM)
                return
            if isinstance(frame, OutputAudioRawFrame):
                playout.wrote(len(frame.audio) / (2 * frame.num_channels * frame.sample_rate))
            elif isinstance(frame, TTSStartedFrame):
                playout.reply_started()
            elif isinstance(frame, TTSStoppedFrame):
                playout.reply_ended()
            elif isinstance(frame, InterruptionFrame):
                heard = playout.cut()
                if heard is not None:
                    await self.push_frame(AudioPlayedFrame(seconds=heard), FrameDirection.UPSTREAM)
        await self.push_frame(frame, direction)

    async def _played_out(self, frame: PlayedOutFrame) -> None:
        await self.playout.wait_played()
        frame.reached.set()


def with_playout(transport) -> list[FrameProcessor]:
    """`transport.output()` followed by the `PlayoutTracker` fed by it, for a pipeline's list:

        Pipeline([transport.input(), user_aggregator, chroma, *with_playout(transport), assistant_aggregator])

    With it, a reply the caller barges in on is cut in the conversation to what the caller heard, and
    a flow's hang-up or transfer waits until the goodbye has been played out. A line (transports/line.py)
    says through its `playout` how much is still unplayed; any other transport plays as it writes."""
    line = getattr(transport, "playout", None)
    return [transport.output(), PlayoutTracker(line if isinstance(line, Playout) else PLAYS_AS_WRITTEN)]
