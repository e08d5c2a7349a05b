"""Voices in calls: a prefix per voice shared across calls, and a switch that starts with the next reply."""

import asyncio

import pytest
import torch
from pipecat.frames.frames import UserStartedSpeakingFrame, UserStoppedSpeakingFrame
from pipecat.tests.utils import SleepFrame, run_test

from agent.runtime import AgentRuntime
from agent.spec import load_agent
from processors.chroma.service import ChromaS2SService
from processors.chroma.session import SpeakingVoice, _voice_cache
from tests.conftest import user_audio
from tests.processors.chroma.test_service import caller_frames
from tests.speech import requires_espeak
from tests.voices.conftest import save, speech
from voices.library import LibraryError, VoiceLibrary
from voices.profile import load_voice

pytestmark = requires_espeak
SPECIALIST_TEXT = "Good afternoon, you are through to billing. I can help with invoices and refunds."


@pytest.fixture
def library(tmp_path, demo_voice):
    library = VoiceLibrary(tmp_path / "voices")
    recording = save(tmp_path / "specialist.wav", speech(SPECIALIST_TEXT))
    library.add("specialist", audio=recording, transcript=SPECIALIST_TEXT, consent_by="no one (espeak-ng)",
                synthetic=True)
    return library


@pytest.fixture
def voices(library, demo_voice):
    return load_voice(demo_voice), library.load("specialist")


def prefix(model, voice):
    return _voice_cache(model).get(model, model.tokenizer, SpeakingVoice.of(voice))


def test_two_calls_with_different_voices_get_different_prefixes(tiny, voices):
    first, second = voices
    audio = user_audio(0.4, 21)

    async def reply_prefix(voice):
        session = tiny.new_session(voice, "Be brief.", max_frames=4)
        async for _ in session.respond(audio):
            pass
        return session._reply.steps.voice

    a, b, a_again = (asyncio.run(reply_prefix(v)) for v in (first, second, first))
    assert a is a_again  # one prefix per voice, shared by every call in the process
    assert a is not b
    assert not same_prefix(a, b) and same_prefix(a, a_again)


def same_prefix(a, b) -> bool:
    return a.length == b.length and all(
        torch.equal(ka, kb) and torch.equal(va, vb) for (ka, va), (kb, vb) in zip(a.keys_values, b.keys_values, strict=True))


def test_a_switch_during_a_reply_changes_the_next_reply_and_keeps_the_conversation(tiny, voices):
    first, second = voices
    turns = (user_audio(0.5, 11), user_audio(0.5, 12))

    async def conversation(switch: bool):
        session = tiny.new_session(first, "Be brief.", max_frames=8, chunk_frames=2)
        replies = []
        for turn, audio in enumerate(turns):
            chunks = []
            async for chunk in session.respond(audio):
                chunks.append(chunk)
                if switch and turn == 0 and len(chunks) == 1:
                    session.set_voice(second)  # mid-reply: more chunks of this reply follow
            steps = session._reply.steps
            replies.append((torch.cat([c.codes for c in chunks]), steps.voice, list(steps.thinker.raw_tokens)))
            if turn == 0:
                assert len(chunks) > 1
        return session, replies

    switched, with_switch = asyncio.run(conversation(True))
    plain, without = asyncio.run(conversation(False))
    # The reply under way when the switch came finished in the first voice, frame for frame.
    assert with_switch[0][1] is prefix(tiny, first) and torch.equal(with_switch[0][0], without[0][0])
    # The next reply speaks from the second voice's prefix, and sounds different.
    assert with_switch[1][1] is prefix(tiny, second) and without[1][1] is prefix(tiny, first)
    assert not torch.equal(with_switch[1][0], without[1][0])
    # The conversation carried over: the thinker heard the same history and said the same.
    assert switched.history_ids == plain.history_ids and switched.turns == plain.turns
    assert with_switch[1][2] == without[1][2]
    assert switched.voice_name == "specialist" and plain.voice_name == "demo"


async def test_the_service_switch_a_flow_node_calls_takes_effect_from_the_next_reply(tiny, voices):
    first, second = voices
    session = tiny.new_session(first, "Be brief.", max_frames=10)
    service = ChromaS2SService(session)
    speaking_at_switch, prefixes = [], []

    @service.event_handler("on_first_audio")
    async def _hand_off(service, _seconds):
        if not speaking_at_switch:
            speaking_at_switch.append(service.speaking)
            await service.set_voice(second)

    @service.event_handler("on_turn_finished")
    async def _finished(_service, _text, _interrupted):
        prefixes.append(session._reply.steps.voice)

    turn = [UserStartedSpeakingFrame(), *caller_frames(0.6, 16000), UserStoppedSpeakingFrame(), SleepFrame(1.5)]
    await run_test(service, frames_to_send=turn + turn)
    assert speaking_at_switch == [True]
    assert prefixes == [prefix(tiny, first), prefix(tiny, second)]
    assert len(session.turns) == 1  # the first reply is in the conversation the second one continues


def test_the_runtime_finds_flow_voices_by_name_once_per_process(tiny, library, demo_voice, tmp_path):
    agent = tmp_path / "agent.yaml"
    agent.write_text(f"name: t\nmodel: tiny\nvoice: {demo_voice}\n")
    runtime = AgentRuntime(load_agent(agent, library=library.root), model=tiny)
    specialist = runtime.find_voice("specialist")
    assert specialist.name == "specialist" and runtime.find_voice("specialist") is specialist
    assert runtime.find_voice(str(demo_voice)) is runtime.voice
    with pytest.raises(LibraryError, match="no voice 'nobody' in the library"):
        runtime.find_voice("nobody")
