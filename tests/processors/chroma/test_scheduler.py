"""Many sessions on one model: every reply in flight advances in one batched step per tick."""

import asyncio

import torch

from processors.chroma.frame_step import GREEDY, FrameStep
from processors.chroma.generation import build_voice_prompt
from processors.chroma.scheduler import FrameScheduler
from tests.conftest import user_audio

PROMPT = "You are a helpful agent."


def codes_of(chunks):
    return torch.cat([c.codes for c in chunks]) if chunks else torch.empty(0, 8, dtype=torch.long)


async def alone(model, voice, audio, frames):
    session = model.new_session(voice=voice, system_prompt=PROMPT, max_frames=frames)
    return codes_of([c async for c in session.respond(audio)])


def test_sessions_that_join_and_leave_at_different_ticks_get_their_codes_alone(tiny, voice):
    """Four replies of different lengths; each starts when the one before it has streamed a few
    chunks, so rows join a running batch and leave it while others go on."""
    plan = [(user_audio(0.8, 41), 24), (user_audio(0.5, 42), 9), (user_audio(1.1, 43), 30), (user_audio(0.6, 44), 14)]
    expected = [asyncio.run(alone(tiny, voice, audio, frames)) for audio, frames in plan]
    scheduler = FrameScheduler.for_model(tiny)
    widest = []

    async def together():
        started = [asyncio.Event() for _ in plan]
        started[0].set()

        async def call(i, audio, frames):
            await started[i].wait()
            session = tiny.new_session(voice=voice, system_prompt=PROMPT, max_frames=frames)
            chunks = []
            async for chunk in session.respond(audio):
                chunks.append(chunk)
                widest.append(scheduler.status()["batch_size"])
                if len(chunks) == 2 and i + 1 < len(plan):
                    started[i + 1].set()
            if i + 1 < len(plan):
                started[i + 1].set()
            return codes_of(chunks)

        return await asyncio.gather(*[call(i, a, f) for i, (a, f) in enumerate(plan)])

    got = asyncio.run(together())
    assert max(widest) >= 3  # the replies really shared ticks
    for i, (mine, theirs) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(mine, theirs), f"session {i} differs inside the batch"


def test_a_barge_in_in_one_session_leaves_the_others_codes_unchanged(tiny, voice):
    audios = [user_audio(0.7, 51), user_audio(0.9, 52), user_audio(0.5, 53)]
    expected = [asyncio.run(alone(tiny, voice, a, 20)) for a in audios]

    async def together():
        sessions = [tiny.new_session(voice=voice, system_prompt=PROMPT, max_frames=20) for _ in audios]
        cut = {}

        async def call(i):
            chunks = []
            async for chunk in sessions[i].respond(audios[i]):
                chunks.append(chunk)
                if i == 1 and len(chunks) == 3:
                    cut["step"] = sessions[i]._reply.steps.step
                    sessions[i].cancel()
            return chunks

        results = await asyncio.gather(*[call(i) for i in range(len(audios))])
        return sessions, results, cut

    sessions, results, cut = asyncio.run(together())
    assert len(results[1]) == 3  # nothing after cancel() returned
    assert sessions[1]._reply.steps.step - cut["step"] <= 1  # at most the tick under way ran
    assert torch.equal(codes_of(results[1]), expected[1][: codes_of(results[1]).shape[0]])
    assert torch.equal(codes_of(results[0]), expected[0])
    assert torch.equal(codes_of(results[2]), expected[2])
    # the cut session keeps going: its next turn starts from what was heard
    sessions[1].heard(4)
    heard = [token for step, token in sessions[1]._reply.steps.entered if step < 4]

    async def next_turn():
        return [c async for c in sessions[1].respond(user_audio(0.4, 54))]

    assert asyncio.run(next_turn())
    assert sessions[1].turns[-1] == tiny.tokenizer.decode(heard)


def test_a_session_whose_consumer_stops_reading_leaves_the_batch(tiny, voice):
    scheduler = FrameScheduler.for_model(tiny)

    async def scenario():
        session = tiny.new_session(voice=voice, system_prompt=PROMPT, max_frames=200)
        async for _chunk in session.respond(user_audio(0.5, 61)):
            break  # the caller hung up: the generator is closed
        await scheduler.run(lambda: None)  # one job runs between ticks: the cancelled row is gone by now
        await scheduler.run(lambda: None)
        return session

    session = asyncio.run(scenario())
    assert session._reply.stream.finished and session._reply.stream.row is None
    assert session._reply.steps.step < 10


def test_batched_step_stays_within_the_argmax_margin_of_the_step_alone(tiny, voice):
    """CPU matrix kernels round a row differently when it shares a product with others (a
    one-row product takes another kernel), so a row's floats in a batch differ from alone by
    about 1e-6. The codes do not: the smallest gap between the best and second-best logit that
    greedy decoding picked from is orders of magnitude above that difference (asserted here)."""
    model = tiny
    ids = torch.tensor(model.tokenizer.encode(voice[1]))
    prompt = build_voice_prompt(model, ids, torch.from_numpy(voice[0]))
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(n, model.config.backbone_config.hidden_size, generator=gen) for n in (3, 1, 2, 1)]

    def run(rows):
        step = FrameStep(model, rows=len(rows))
        lengths = [step.pool.load(r, prompt.keys_values) for r in range(len(rows))]
        with torch.inference_mode():
            hidden = step.backbone_step([inputs[i] for i in rows], lengths, [prompt.mask] * len(rows))
            logits = torch.nn.functional.linear(hidden, step._head0)
            codes = step.decode(hidden, [GREEDY] * len(rows))
        return hidden, logits, codes

    batch_hidden, batch_logits, batch_codes = run([0, 1, 2, 3])
    for i in range(4):
        hidden, logits, codes = run([i])
        top2 = logits[0].topk(2).values
        margin = float(top2[0] - top2[1])
        difference = float((batch_logits[i] - logits[0]).abs().max())
        assert difference <= 1e-4
        assert margin > 10 * difference
        assert torch.equal(batch_codes[i], codes[0])
        assert torch.allclose(batch_hidden[i], hidden[0], atol=1e-5)


def test_the_scheduler_reports_what_a_server_needs(tiny, voice):
    scheduler = FrameScheduler.for_model(tiny)
    seen = []

    async def scenario():
        sessions = [tiny.new_session(voice=voice, max_frames=8) for _ in range(3)]

        async def call(s, seed):
            async for _ in s.respond(user_audio(0.4, seed)):
                seen.append(scheduler.status())

        await asyncio.gather(*[call(s, 70 + i) for i, s in enumerate(sessions)])

    asyncio.run(scenario())
    assert max(s["batch_size"] for s in seen) >= 2
    assert max(s["sessions"] for s in seen) >= 2
    assert all(s["tick_seconds"] > 0 for s in seen)
    assert all(isinstance(s["behind_real_time"], bool) for s in seen)
    assert any(s["reply_rtf_max"] > 0 for s in seen)
    assert all(s["reply_rtf_max"] >= s["reply_rtf_median"] >= 0 for s in seen)


def test_a_new_turn_starts_in_pieces_with_the_others_ticks_between_them(tiny, voice, monkeypatch):
    scheduler = FrameScheduler.for_model(tiny)
    events = []
    tick = scheduler._tick

    def recorded_tick():
        events.append("tick")
        tick()

    monkeypatch.setattr(scheduler, "_tick", recorded_tick)

    async def scenario():
        streaming = tiny.new_session(voice=voice, system_prompt=PROMPT, max_frames=60)
        # a voice not heard before: its prefix is built in a piece of its own
        joining = tiny.new_session(voice=(voice[0] * 0.7, voice[1]), system_prompt=PROMPT, max_frames=4)
        start = joining._start_reply

        def start_recorded(*args):
            gen = start(*args)
            try:
                while True:
                    next(gen)
                    events.append("piece")
                    yield
            except StopIteration as done:
                events.append("piece")
                return done.value

        monkeypatch.setattr(joining, "_start_reply", start_recorded)
        first = asyncio.Event()

        async def stream():
            async for _chunk in streaming.respond(user_audio(0.5, 81)):
                first.set()

        background = asyncio.create_task(stream())
        await first.wait()
        events.append("join")
        [c async for c in joining.respond(user_audio(0.5, 82))]
        streaming.cancel()
        await background

    asyncio.run(scenario())
    after = events[events.index("join"):]
    pieces = [i for i, e in enumerate(after) if e == "piece"]
    assert len(pieces) == 2  # the thinker's prefill; the new voice's prefix and the row
    for a, b in zip(pieces, pieces[1:], strict=False):
        assert "tick" in after[a:b]  # the streaming call advanced between two pieces
