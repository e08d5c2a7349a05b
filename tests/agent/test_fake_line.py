"""The least line a call runs on, written only against transports.line.Line: a pipecat transport whose
input and output are two small processors of its own. A whole call on the tiny model runs on it
through runtime.new_call(line).run(): the caller's speech is answered in audio at the line's rate, a
key press moves the call's flow, and the agent's hang-up ends the call and frees it.

The thinker's words are scripted (ScriptedReasoner), as in tests/flows/test_calls.py."""

import asyncio
import textwrap
from pathlib import Path

import numpy as np
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.frames.frames import InputAudioRawFrame, InputDTMFFrame, OutputAudioRawFrame, StartFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_transport import BaseTransport

from agent.runtime import AgentRuntime
from agent.spec import load_agent
from processors.chroma.scripted import ScriptedReasoner
from tests.speech import requires_espeak, silence, synthesize
from transports.line import Line, Playout

ROOT = Path(__file__).resolve().parents[2]
CHUNK_SECS = 0.02


class FakeInput(FrameProcessor):
    """The caller's side: audio and keys the test hands it, pushed into the call once it has started."""

    def __init__(self):
        super().__init__()
        self.started = asyncio.Event()

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, StartFrame):
            self.started.set()


class FakeOutput(FrameProcessor):
    """The agent's side: keeps each chunk of the agent's audio (rate, bytes) and passes it on."""

    def __init__(self):
        super().__init__()
        self.audio: list[tuple[int, bytes]] = []

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        if isinstance(frame, OutputAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            self.audio.append((frame.sample_rate, frame.audio))
        await self.push_frame(frame, direction)


class NothingUnplayed:
    def unplayed_seconds(self) -> float:
        return 0.0

    async def wait_played(self) -> None:
        return None


class FakeLine(BaseTransport):
    kind = "fake"
    in_rate = 16000
    out_rate = 8000
    can_transfer = False

    def __init__(self):
        super().__init__(name="fake-line")
        self._input, self._output = FakeInput(), FakeOutput()
        self.playout = NothingUnplayed()
        self.hung_up = False

    def input(self) -> FakeInput:
        return self._input

    def output(self) -> FakeOutput:
        return self._output

    async def hang_up(self) -> None:
        self.hung_up = True

    async def transfer(self, target: str) -> bool:
        return False

    async def speak(self, pcm: np.ndarray, then_silence_secs: float) -> None:
        """The caller's audio in real time, 20 ms at a time, then line silence (VAD needs frames to end a turn)."""
        pcm = np.concatenate([pcm, silence(then_silence_secs, self.in_rate)])
        step = int(self.in_rate * CHUNK_SECS)
        for i in range(0, pcm.size, step):
            chunk = pcm[i : i + step].astype(np.int16).tobytes()
            await self._input.push_frame(InputAudioRawFrame(audio=chunk, sample_rate=self.in_rate, num_channels=1))
            await asyncio.sleep(CHUNK_SECS)

    async def press(self, digit: str) -> None:
        await self._input.push_frame(InputDTMFFrame(button=KeypadEntry(digit)))


FLOW = """
initial_node: menu
nodes:
  menu:
    respond_immediately: false
    task_messages: [{role: developer, content: Greet the caller and ask them to press 1.}]
    collect_dtmf: {max_digits: 1, routes: {"1": bye}}
  bye:
    task_messages: [{role: developer, content: Say goodbye.}]
    post_actions:
      - type: end_call
"""


def runtime_for(tmp_path: Path, tiny_model) -> AgentRuntime:
    (tmp_path / "flow.yaml").write_text(textwrap.dedent(FLOW))
    agent = tmp_path / "agent.yaml"
    agent.write_text(
        f"""
name: fake line agent
model: tiny
voice: {ROOT / "examples/voices/demo"}
system_prompt: You are a test agent.
flow: flow.yaml
turn:
  detector: silence
  silence_secs: 0.4
response:
  max_seconds: 3
"""
    )
    scripts = [["Hi."], ["Bye."]]
    return AgentRuntime(
        load_agent(agent), model=tiny_model, reasoner=lambda: ScriptedReasoner(tiny_model.tokenizer, scripts)
    )


async def until(condition, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition() and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return condition()


@requires_espeak
async def test_a_call_runs_on_a_line_written_only_against_the_contract(tmp_path, tiny_model):
    runtime = runtime_for(tmp_path, tiny_model)
    line = FakeLine()
    assert isinstance(line, Line) and isinstance(line.playout, Playout)
    call = runtime.new_call(line)
    assert call.stats.kind == "fake" and runtime.calls == {call.stats.call_id: call}
    running = asyncio.create_task(call.run())
    try:
        await asyncio.wait_for(line.input().started.wait(), 10)
        await line.speak(synthesize("Hello, is anybody there?", line.in_rate), then_silence_secs=1.0)
        assert await until(lambda: call.stats.texts, 30), "the caller's speech was never answered"
        assert call.stats.texts == ["Hi."] and call.flow.nodes == ["menu"]
        await line.press("1")
        stats = await asyncio.wait_for(asyncio.shield(running), 30)
    finally:
        if not running.done():
            await call.cancel("test over")
        await asyncio.gather(running, return_exceptions=True)
    # The agent answered in audio, all of it at the line's out_rate.
    rates = {rate for rate, _ in line.output().audio}
    assert rates == {8000} and sum(len(audio) for _, audio in line.output().audio) > 0
    # The key moved the flow; its goodbye node's end_call hung up: the agent ended the call.
    assert call.flow.nodes == ["menu", "bye"] and stats.texts == ["Hi.", "Bye."]
    assert call.ended_by_agent and call.end_reason() == ("agent_ended", None)
    # The call is freed: no call, no session, nothing active.
    assert runtime.calls == {} and runtime.sessions == 0 and runtime.metrics.calls_active == 0
