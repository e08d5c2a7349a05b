"""The call's account of what the caller heard (processors/playout.py) between the speech service and a
line: a cut reply is kept to what was written less what the line left unplayed, and a call action
waits for the line's own word that the audio has played.

The session stands in for the engine (a reply must be cut mid-way on cue); the line is a fake `Playout`."""

import asyncio
import time
from types import SimpleNamespace

import numpy as np
from pipecat.frames.frames import InterruptionFrame, TTSAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.tests.utils import SleepFrame, run_test

from processors.chroma.config import FRAME_SECONDS, SAMPLE_RATE
from processors.chroma.service import CallActionFrame, ChromaS2SService
from processors.chroma.session import AudioChunk
from processors.playout import CallPlayout, PlayoutTracker, with_playout
from tests.processors.chroma.test_service_failures import caller_turn
from transports.line import Playout, PlaysAsWritten

FRAME = round(SAMPLE_RATE * FRAME_SECONDS)


class SlowSession:
    """Yields two-frame chunks a little apart, so a barge-in lands mid-reply; records what it is told
    the caller heard."""

    def __init__(self, chunks: int = 30):
        self.model = SimpleNamespace(source="stand-in")
        self.system_prompt = ""
        self.on_tool_call = None
        self.kept_text = ""
        self.chunks = chunks
        self.heard_frames: list[int] = []

    async def respond(self, user_audio=None, *, say=None):
        for i in range(self.chunks):
            yield AudioChunk(audio=np.full(2 * FRAME, 0.1, np.float32), frames=(2 * i, 2 * i + 2),
                             text_tokens=[], text="", codes=None)
            await asyncio.sleep(0.04)

    def cancel(self): ...
    def heard(self, frames): self.heard_frames.append(frames)
    def instruct(self, text): ...
    def set_tools(self, tools): ...


class FakeLine:
    """A line's Playout: `unplayed` seconds left at the far end on barge-in; `wait_played` takes
    `play_secs` and records when it returned."""

    def __init__(self, unplayed: float = 0.0, play_secs: float = 0.0):
        self.unplayed = unplayed
        self.play_secs = play_secs
        self.played_at: float | None = None
        self.written_when_asked: float | None = None
        self.playout: CallPlayout | None = None

    def unplayed_seconds(self) -> float:
        return self.unplayed

    async def wait_played(self) -> None:
        self.written_when_asked = self.playout.written_seconds
        await asyncio.sleep(self.play_secs)
        self.played_at = time.monotonic()


def tracked(line: FakeLine) -> PlayoutTracker:
    tracker = PlayoutTracker(line)
    line.playout = tracker.playout
    return tracker


async def test_a_cut_reply_keeps_what_was_written_less_what_the_line_left_unplayed():
    session = SlowSession()
    service = ChromaS2SService(session)
    cuts = []

    @service.event_handler("on_barge_in")
    async def _cut(_service, heard, sent):
        cuts.append((heard, sent))

    line = FakeLine(unplayed=0.3)
    down, _ = await run_test(
        Pipeline([service, tracked(line)]),
        frames_to_send=[*caller_turn(), SleepFrame(0.5), InterruptionFrame(), SleepFrame(0.3)],
        expected_down_frames=None,
    )
    cut_at = next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame))
    written = sum(len(f.audio) / 2 / f.sample_rate for f in down[:cut_at] if isinstance(f, TTSAudioRawFrame))
    assert written >= 0.64  # several chunks went out before the barge-in
    heard = written - 0.3
    # Whole frames only, as the service has always rounded (a float's hair under a whole frame counts).
    expected = int(heard / FRAME_SECONDS + 1e-6)
    assert session.heard_frames == [expected]
    assert cuts == [(expected, cuts[0][1])] and cuts[0][1] >= expected
    assert expected < written / FRAME_SECONDS  # the unplayed audio was taken off


async def test_a_call_action_runs_only_after_the_lines_wait_played():
    service = ChromaS2SService(SlowSession())
    line = FakeLine(play_secs=0.4)
    ran_at = []

    async def hang_up():
        ran_at.append(time.monotonic())

    pcm = np.full(SAMPLE_RATE // 2, 1000, np.int16).tobytes()  # half a second of agent audio
    await run_test(
        Pipeline([service, tracked(line)]),
        frames_to_send=[
            CallActionFrame(audio=pcm, rate=SAMPLE_RATE),
            CallActionFrame(when_quiet=hang_up),
            SleepFrame(1.5),
        ],
        expected_down_frames=None,
    )
    assert abs(line.written_when_asked - 0.5) < 1e-9  # the line was asked once all the audio was written
    assert len(ran_at) == 1 and line.played_at is not None
    assert ran_at[0] >= line.played_at


def test_the_account_counts_only_the_reply_under_way():
    playout = CallPlayout(FakeLine(unplayed=0.1))
    playout.wrote(2.0)  # an earlier reply, played out
    assert playout.cut() is None  # no reply under way: nothing to report
    playout.reply_started()
    playout.wrote(0.5)
    assert abs(playout.cut() - 0.4) < 1e-9
    assert playout.cut() is None  # reported once
    assert playout.unplayed_seconds() == 0.1


def test_with_playout_reads_a_lines_playout_and_else_plays_as_written():
    line = FakeLine()
    assert isinstance(line, Playout)
    with_line = SimpleNamespace(output=lambda: "output", playout=line)
    assert with_playout(with_line)[1].playout.line is line
    bare = SimpleNamespace(output=lambda: "output")
    assert isinstance(with_playout(bare)[1].playout.line, PlaysAsWritten)
