"""Outbound SIP calls to a real SIP phone: baresip answers (auto-answer), speaks a committed recording,
and records what it decoded, so the agent's audio is checked as the callee received it."""

import asyncio
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.outbound import place_call, placed_call
from agent.runtime import AgentRuntime
from agent.spec import load_agent
from agent.testing.baresip import BARESIP, write_pcm
from agent.testing.callee import answering_phone
from agent.testing.lines import loud
from processors.audio_io import read_audio, to_pcm16

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "tests/fixtures/answering"
pytestmark = pytest.mark.skipif(BARESIP is None, reason="baresip is not installed (apt-get install baresip)")


@pytest.fixture(autouse=True)
def engine_keeps_up(monkeypatch):
    """The engine's real-time verdict (measured on this shared, loaded CPU) would refuse calls as busy;
    these tests are about the calls, and the capacity rules have their own tests (tests/agent/test_dial.py)."""
    monkeypatch.setattr(AgentRuntime, "engine_state", lambda self: None)


def make_runtime(folder: Path, model, outbound: str = "{}") -> AgentRuntime:
    rtp_first = random.randrange(30000, 59000, 2)
    path = folder / "agent.yaml"
    path.write_text(
        f"name: outbound test agent\nmodel: tiny\nvoice: {ROOT / 'examples/voices/demo'}\n"
        "turn: {detector: silence, silence_secs: 0.5}\nresponse: {max_seconds: 1}\n"
        f"transports:\n  sip: {{host: 127.0.0.1, rtp_ports: [{rtp_first}, {rtp_first + 99}]}}\n"
        f"outbound: {outbound}\n"
    )
    return AgentRuntime(load_agent(path), model=model)


async def answered(placed, timeout: float = 15.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if placed.call is not None or placed.done:
            return
        await asyncio.sleep(0.02)


async def test_baresip_answers_says_hello_and_hears_the_agent_reply(tmp_path, tiny_model):
    runtime = make_runtime(tmp_path, tiny_model)
    phone_folder = tmp_path / "phone"
    phone_folder.mkdir()
    phone, uri = await answering_phone(phone_folder)
    try:
        placed = placed_call(runtime, await place_call(runtime, uri))
        await answered(placed)
        assert placed.call is not None, placed.detail
        # Padded: baresip hangs up when its microphone file runs out.
        hello = to_pcm16(read_audio(FIXTURES / "human_hello.wav", 8000))
        said_at = await phone.play(
            write_pcm(phone_folder / "hello.wav", np.concatenate([hello, np.zeros(80000, np.int16)]))
        )
        heard = []
        for _ in range(1000):  # 20 s at most: the tiny model replies slowly on a loaded machine
            heard += phone.heard()
            if placed.call.stats.turns >= 1 and any(loud(chunk) for t, chunk in heard if t > said_at + 1.0):
                break
            await asyncio.sleep(0.02)
        assert placed.answered_by == "human", placed.events
        # The callee decoded the agent's reply (the tiny model's noise) over RTP, after its greeting.
        assert any(loud(chunk) for t, chunk in heard if t > said_at + 1.0), (
            placed.call.stats.turns,
            placed.events,
        )
        await phone.hang_up()
        assert await placed.wait(10) == "answered"
        assert placed.detail == "the callee hung up"
    finally:
        await phone.close()


async def test_the_agent_hangs_up_on_a_machine_answering_on_baresip(tmp_path, tiny_model):
    runtime = make_runtime(tmp_path, tiny_model, "{on_machine: hang_up}")
    phone_folder = tmp_path / "phone"
    phone_folder.mkdir()
    phone, uri = await answering_phone(phone_folder)
    try:
        placed = placed_call(runtime, await place_call(runtime, uri))
        await answered(placed)
        assert placed.call is not None, placed.detail
        await phone.play(Path(shutil.copy(FIXTURES / "machine_beep.wav", phone_folder / "greeting.wav")))
        assert await placed.wait(20) == "answered"
        assert placed.answered_by == "machine"
        await asyncio.wait_for(phone.closed.wait(), 10)
        assert phone.ended  # the agent's BYE ended the call at the phone
        assert placed.call.stats.turns == 0
    finally:
        await phone.close()
