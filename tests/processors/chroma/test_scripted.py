"""The scripted reasoner: the test picks the thinker's tokens, the model runs everything else."""

import asyncio

import torch
from transformers import DynamicCache

from processors.chroma.generation import ResponseSteps, build_voice_prompt, prefill_thinker
from processors.chroma.scripted import Call, Say, ScriptedReasoner
from processors.chroma.text import ChatLayout, Listener
from processors.chroma.tools import ToolCallFilter
from tests.conftest import user_audio

PROMPT = "You are a helpful agent."


def scripted_session(tiny, voice, monkeypatch, reasoner, **kwargs):
    return tiny.new_session(voice=voice, system_prompt=PROMPT, thinker_stream=reasoner, **kwargs)


async def reply_text(session, audio):
    text = ""
    async for item in session.respond(audio):
        text = getattr(item, "text", text)
    return text


def test_each_reply_speaks_its_scripted_turn(tiny, voice, monkeypatch):
    reasoner = ScriptedReasoner(tiny.tokenizer, [["Hello there."], [Say("Second"), " turn."]])
    session = scripted_session(tiny, voice, monkeypatch, reasoner, max_frames=60)
    assert asyncio.run(reply_text(session, user_audio(0.5, 1))) == "Hello there."
    assert asyncio.run(reply_text(session, user_audio(0.5, 2))) == "Second turn."
    assert asyncio.run(reply_text(session, user_audio(0.5, 3))) == ""  # past the script: nothing
    end = tiny.config.im_end_token_id
    assert reasoner.replies[0] == [*tiny.tokenizer.encode("Hello there."), end]
    assert session.turns[:2] == ["Hello there.", "Second turn."]


def test_the_backbone_gets_the_thinkers_own_states_for_the_forced_tokens(tiny, voice):
    """Teacher forcing: the hidden state paired with forced token i is what the thinker computes
    after reading the forced tokens before it."""
    audio = user_audio(0.5, 4)
    text = "Hi you."
    features, mask, n_audio = Listener(tiny).hear(audio)
    layout = ChatLayout(tiny.tokenizer)
    ids = layout.system(PROMPT) + layout.user_audio_turn(n_audio)
    cache = DynamicCache()
    hidden, token, next_pos = prefill_thinker(tiny, torch.tensor([ids]), cache, 0, features, mask)
    stream = ScriptedReasoner(tiny.tokenizer, [[text]])(tiny, cache, next_pos, hidden, token, 2)
    forced = []
    while (t := stream.next_token()) is not None:
        forced.append(t)
    expected_ids = [*tiny.tokenizer.encode(text), tiny.config.im_end_token_id]
    assert [t.token_id for t in forced] == expected_ids

    full = DynamicCache()
    all_ids = torch.tensor([ids + expected_ids[:-1]])
    lengths = mask.sum(-1)
    positions = tiny.thinker_positions(all_ids, lengths)
    out = tiny.thinker.model(
        input_ids=all_ids, input_features=features, feature_attention_mask=mask,
        position_ids=positions, cache=full, use_cache=True,
    ).last_hidden_state[0]
    for i, t in enumerate(forced):
        assert torch.allclose(t.hidden[0], out[len(ids) - 1 + i], atol=1e-4)
        assert torch.allclose(t.embedding[0], tiny.embed_text(torch.tensor([t.token_id]))[0])

    # and the backbone, decoder and codec run on them as on any reply
    voice_prompt = build_voice_prompt(tiny, torch.tensor(tiny.tokenizer.encode(voice[1])), torch.from_numpy(voice[0]))
    stream = ScriptedReasoner(tiny.tokenizer, [[text]])(tiny, DynamicCache(), 0, hidden, token, 2)
    steps = ResponseSteps(tiny, voice_prompt, stream, max_frames=2 * len(expected_ids) + 2)
    while not steps.done:
        steps.next_frame()
    assert [tok for _, tok in steps.entered] == expected_ids
    assert [s for s, _ in steps.entered] == list(range(0, 2 * len(expected_ids), 2))


def test_a_scripted_call_pauses_the_turn_unspoken_and_its_result_continues_it(tiny, voice, monkeypatch):
    calls = []

    def filter_factory():
        return ToolCallFilter(tiny.tokenizer.decode, calls.append, [tiny.config.im_end_token_id])

    reasoner = ScriptedReasoner(
        tiny.tokenizer,
        [["One moment. ", Call("lookup_order", {"order_id": "A17"}), Say(lambda result: f"Result {result}.")],
         ["Next turn."]],
    )
    session = scripted_session(tiny, voice, monkeypatch, reasoner, max_frames=200, token_filter=filter_factory)

    async def run():
        first = await reply_text(session, user_audio(0.5, 5))
        paused = session.paused_at_call
        session.tool_result("ok")
        answer = await reply_text(session, None)  # no new audio: the same turn goes on
        following = await reply_text(session, user_audio(0.5, 6))
        return first, paused, answer, following

    first, paused, answer, following = asyncio.run(run())
    assert [(c.name, c.arguments) for c in calls] == [("lookup_order", {"order_id": "A17"})]
    assert first == "One moment. " and paused
    assert answer == "Result ok."
    assert following == "Next turn."
    assert reasoner.results == ["ok"]
