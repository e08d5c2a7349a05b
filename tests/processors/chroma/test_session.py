"""The streaming session: chunks, the 1:2 schedule, barge-in, memory across turns."""

import asyncio
import threading

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from processors.chroma.frame_step import FrameStep
from processors.chroma.generation import (
    ResponseSteps,
    ThinkerStream,
    TokenFilter,
    build_voice_prompt,
    prefill_thinker,
)
from processors.chroma.text import Listener
from tests.conftest import processor_inputs, user_audio

PROMPT = "You are a helpful agent."


async def collect(session, audio, cancel_after_chunks=None):
    chunks = []
    async for chunk in session.respond(audio):
        chunks.append(chunk)
        if cancel_after_chunks is not None and len(chunks) == cancel_after_chunks:
            session.cancel()
    return chunks


def run(coro):
    return asyncio.run(coro)


def test_session_codes_equal_generate_codes(tiny, voice):
    audio = user_audio(1.0, 21)
    session = tiny.new_session(voice=voice, system_prompt=PROMPT, max_frames=14)
    chunks = run(collect(session, audio))
    codes = torch.cat([c.codes for c in chunks])
    expected = tiny.generate_codes(processor_inputs(tiny, voice, audio, PROMPT), max_new_frames=14)[0]
    assert torch.equal(codes, expected)


@pytest.mark.parametrize("chunk_frames", [1, 2, 3, 4])
def test_chunks_are_tagged_and_streamed_audio_equals_one_shot_decode(tiny, voice, chunk_frames):
    session = tiny.new_session(voice=voice, system_prompt=PROMPT, max_frames=11, chunk_frames=chunk_frames)
    chunks = run(collect(session, user_audio(0.7, 22)))
    assert chunks[0].frames == (0, min(chunk_frames, 11))
    assert all(a.frames[1] == b.frames[0] for a, b in zip(chunks, chunks[1:], strict=False))
    assert chunks[-1].frames[1] == 11
    for c in chunks:
        assert c.audio.dtype == np.float32 and c.audio.size == (c.frames[1] - c.frames[0]) * 1920
        assert len(c.text_tokens) == (c.frames[1] - 1) // 2 + 1  # token t belongs to frame 2t
    codes = torch.cat([c.codes for c in chunks]).unsqueeze(0)
    one_shot = tiny.decode_codes(codes)[0].numpy()
    assert np.abs(np.concatenate([c.audio for c in chunks]) - one_shot).max() < 1e-4


def test_one_text_token_per_two_frames_in_the_trace(tiny, voice):
    session = tiny.new_session(voice=voice, system_prompt=PROMPT, max_frames=12)
    run(collect(session, user_audio(0.6, 23)))
    trace = session.trace
    assert len(trace) == 12
    assert [t.step for t in trace] == list(range(12))
    assert [t.frame_input for t in trace] == [False] + [True] * 11
    with_text = [t.step for t in trace if t.text_token is not None]
    assert with_text == list(range(0, 12, 2))  # text token t enters with frame 2t
    assert [t.text_token for t in trace if t.text_token is not None] == session._reply.steps.thinker.raw_tokens[:6]


def test_cancel_stops_within_one_step_and_keeps_only_heard_text(tiny, voice):
    session = tiny.new_session(voice=voice, system_prompt=PROMPT, max_frames=200, chunk_frames=2)

    async def scenario():
        chunks = []
        async for chunk in session.respond(user_audio(0.6, 24)):
            chunks.append(chunk)
            if len(chunks) == 3:
                steps_at_cancel = session._reply.steps.step
                session.cancel()
        return chunks, steps_at_cancel

    chunks, steps_at_cancel = run(scenario())
    assert len(chunks) == 3  # nothing after cancel() returned
    # the worker may have been inside one step when cancel came; none starts after it
    assert session._reply.steps.step - steps_at_cancel <= 1
    session.heard(3)
    entered = session._reply.steps.entered
    heard_tokens = [tok for step, tok in entered if step < 3]
    assert heard_tokens == [entered[0][1], entered[1][1]]  # frames 0..2 consumed tokens 0 and 1
    assert session.kept_text == tiny.tokenizer.decode(heard_tokens)
    run(collect(session, user_audio(0.4, 25)))
    assert session.turns == [tiny.tokenizer.decode(heard_tokens)]


@torch.inference_mode()
def _reply_from_scratch(model, voice, history_ids, audios, frames):
    listener = Listener(model)
    feats = [listener.features(a) for a in audios]
    longest = max(f.shape[-1] for f, _ in feats)
    features = torch.cat([torch.nn.functional.pad(f, (0, longest - f.shape[-1])) for f, _ in feats])
    mask = torch.cat([torch.nn.functional.pad(m, (0, longest - m.shape[-1])) for _, m in feats])
    cache = DynamicCache()
    ids = torch.tensor([history_ids])
    hidden, token, pos = prefill_thinker(model, ids, cache, 0, features, mask)
    vp = build_voice_prompt(model, torch.tensor(model.tokenizer.encode(voice[1])), torch.from_numpy(voice[0]))
    steps = ResponseSteps(model, vp, ThinkerStream(model, cache, pos, hidden, token), frames)
    return torch.stack([c for c in iter(steps.next_frame, None)])


@pytest.mark.parametrize("heard", [None, 5])
def test_turn_two_with_kept_cache_equals_full_history_from_scratch(tiny, voice, heard):
    a1, a2 = user_audio(0.9, 26), user_audio(0.6, 27)
    session = tiny.new_session(voice=voice, system_prompt=PROMPT, max_frames=10)
    run(collect(session, a1, cancel_after_chunks=4 if heard else None))
    if heard:
        session.heard(heard)
    turn2 = torch.cat([c.codes for c in run(collect(session, a2))])
    expected = _reply_from_scratch(tiny, voice, session.history_ids, [a1, a2], 10)
    assert torch.equal(turn2, expected)


def test_turn_two_prefills_only_new_tokens(tiny, voice, monkeypatch):
    session = tiny.new_session(voice=voice, system_prompt=PROMPT, max_frames=6)
    run(collect(session, user_audio(0.5, 28)))
    seen = []
    original = tiny.thinker_forward

    def spy(input_ids, *args, **kwargs):
        seen.append(input_ids.shape[1])
        return original(input_ids, *args, **kwargs)

    monkeypatch.setattr(tiny, "thinker_forward", spy)
    history_before = len(session.history_ids)
    run(collect(session, user_audio(0.5, 29)))
    new_tokens = len(session.history_ids) - history_before
    assert seen[0] == new_tokens < len(session.history_ids)


def test_voice_prefix_reuse_equals_no_reuse_and_is_built_once(tiny, voice, monkeypatch):
    audio = user_audio(0.6, 30)
    reused = tiny.new_session(voice=voice, system_prompt=PROMPT, max_frames=8)
    fresh = tiny.new_session(voice=voice, system_prompt=PROMPT, max_frames=8, reuse_voice_prompt=False)
    a = torch.cat([c.codes for c in run(collect(reused, audio))])
    b = torch.cat([c.codes for c in run(collect(fresh, audio))])
    assert torch.equal(a, b)
    import processors.chroma.session as session_module

    calls = []
    real = session_module.build_voice_prompt
    monkeypatch.setattr(session_module, "build_voice_prompt", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = tiny.new_session(voice=voice, system_prompt="another call", max_frames=4)
    run(collect(again, audio))
    run(collect(again, audio))
    assert calls == []  # same voice: the process-wide prefix is reused
    other = tiny.new_session(voice=(voice[0] * 0.5, voice[1]), max_frames=4)
    run(collect(other, audio))
    assert calls == [1]


def test_lookahead_does_not_change_output_and_hook_can_drop_tokens(tiny, voice):
    audio = user_audio(0.6, 31)
    base = tiny.new_session(voice=voice, system_prompt=PROMPT, max_frames=10, lookahead=0)
    ahead = tiny.new_session(voice=voice, system_prompt=PROMPT, max_frames=10, lookahead=6)
    codes0 = torch.cat([c.codes for c in run(collect(base, audio))])
    codes6 = torch.cat([c.codes for c in run(collect(ahead, audio))])
    assert torch.equal(codes0, codes6)
    raw = base._reply.steps.thinker.raw_tokens
    victim = raw[0]

    class DropOne(TokenFilter):
        def push(self, token):
            return [] if token.token_id == victim else [token]

    hooked = tiny.new_session(voice=voice, system_prompt=PROMPT, max_frames=10, token_filter=DropOne)
    run(collect(hooked, audio))
    spoken = [tok for _, tok in hooked._reply.steps.entered]
    assert spoken and victim not in spoken
    hooked_raw = hooked._reply.steps.thinker.raw_tokens
    assert spoken == [t for t in hooked_raw if t != victim][: len(spoken)]


def test_model_steps_run_off_the_event_loop(tiny, voice, monkeypatch):
    threads = set()
    original = FrameStep.step

    def spy(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(FrameStep, "step", spy)
    session = tiny.new_session(voice=voice, max_frames=4)
    run(collect(session, user_audio(0.3, 32)))
    assert threads and threading.main_thread().name not in threads
    assert all(name.startswith("chroma-") for name in threads)


def test_bad_settings_are_refused(tiny, voice):
    with pytest.raises(ValueError, match="chunk_frames is 5, expected 1 to 4"):
        tiny.new_session(voice=voice, chunk_frames=5)
    with pytest.raises(ValueError, match="transcript is empty"):
        tiny.new_session(voice=(voice[0], "  "))
