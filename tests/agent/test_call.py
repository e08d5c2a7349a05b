"""Whole calls through the real pipeline (file transport, VAD, end of turn, Chroma service on the
tiny model, playout tracking), in real time."""

import asyncio
from pathlib import Path

import numpy as np

from agent.runtime import AgentRuntime
from agent.simulate import simulate_call
from agent.spec import load_agent
from tests.speech import requires_espeak, silence, speech_bounds, synthesize

ROOT = Path(__file__).resolve().parents[2]
RATE = 16000


def agent_file(tmp_path, *, max_seconds=1, detector="silence", allow_interruptions=True) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"""
name: test agent
model: tiny
voice: {ROOT / "examples/voices/demo"}
system_prompt: You are a test agent.
turn:
  detector: {detector}
  silence_secs: 0.5
response:
  max_seconds: {max_seconds}
  allow_interruptions: {str(allow_interruptions).lower()}
"""
    )
    return path


def runtime_for(tmp_path, tiny_model, **kw) -> AgentRuntime:
    return AgentRuntime(load_agent(agent_file(tmp_path, **kw)), model=tiny_model)


def agent_segments(recording: np.ndarray, rate: int, min_gap: float = 0.3) -> list[tuple[float, float]]:
    """(start, end) seconds of the agent's non-silent stretches, merging gaps shorter than min_gap."""
    block = rate // 100
    loud = np.abs(recording[: recording.size // block * block].reshape(-1, block)).max(1) > 30
    segments: list[list[float]] = []
    for i in np.flatnonzero(loud):
        t = i / 100
        if segments and t - segments[-1][1] <= min_gap:
            segments[-1][1] = t + 0.01
        else:
            segments.append([t, t + 0.01])
    return [(a, b) for a, b in segments]


def caller(*parts) -> np.ndarray:
    return np.concatenate([p if isinstance(p, np.ndarray) else silence(p, RATE) for p in parts])


@requires_espeak
async def test_two_caller_turns_get_two_agent_turns_at_the_output_rate(tmp_path, tiny_model):
    first = synthesize("Hello, I would like to check my order.", RATE)
    second = synthesize("Thank you, that is all.", RATE)
    audio = caller(0.3, first, 2.5, second, 0.2)
    first_end = 0.3 + speech_bounds(first, RATE)[1]
    second_start = 0.3 + first.size / RATE + 2.5 + speech_bounds(second, RATE)[0]
    second_end = 0.3 + first.size / RATE + 2.5 + second.size / RATE

    runtime = runtime_for(tmp_path, tiny_model)
    call, recording, transport = await simulate_call(runtime, audio, RATE, out_rate=8000, settle_secs=0.5)
    stats = call.stats

    assert stats.turns == 2 and len(stats.ttfa) == 2 and stats.barge_ins == 0
    segments = agent_segments(recording, 8000)
    assert len(segments) == 2, segments
    (a0, a1), (b0, b1) = segments
    # Each reply comes after the caller's turn it answers, and the first ends before the caller speaks again.
    assert first_end < a0 < second_start and a1 <= second_start
    assert b0 > second_end
    # max_seconds: 1 caps a reply at 12 frames of 80 ms of audio (plus the last output chunk's padding).
    # The cap is on what was sent; its span on the call's clock also holds any gap a busy core leaves
    # between chunks, so that gets a margin (a gap of 0.3 s or more would split the segment).
    for start, end in segments:
        sent = sum(s.size / r for t, r, s in transport.agent_chunks if start - 0.05 <= t < end)
        assert 0.5 < sent <= 12 * 0.08 + 0.1, (start, end, sent)
        assert end - start <= sent + 0.6, (start, end, sent)
    assert recording.size >= int((second_end + 0.5) * 8000)  # on the call's timeline, silences included
    assert runtime.metrics.turns == 2 and runtime.metrics.calls_active == 0


@requires_espeak
async def test_barge_in_stops_the_agent_within_one_output_chunk_and_keeps_what_was_heard(tmp_path, tiny_model):
    first = synthesize("Please tell me everything about my account.", RATE)
    interruption = synthesize("Wait, stop, I have another question for you.", RATE)
    audio = caller(0.3, first, 1.6, interruption, 0.2)
    interruption_start = 0.3 + first.size / RATE + 1.6 + speech_bounds(interruption, RATE)[0]

    runtime = runtime_for(tmp_path, tiny_model, max_seconds=6)
    call, recording, transport = await simulate_call(runtime, audio, RATE, out_rate=24000, settle_secs=0.5)
    stats = call.stats

    assert stats.barge_ins == 1
    # pipecat interrupts whenever the caller starts speaking; the barge-in is the first one while
    # the agent's first reply is playing.
    first_audio = transport.agent_chunks[0][0]
    cut_at = next(t for kind, t, *_ in transport.events if kind == "interruption" and t > first_audio)
    assert cut_at > interruption_start
    # After the interruption reached the output, at most the chunk being played goes out before the
    # agent's next reply (which starts only after the caller's new turn ends).
    next_reply = min(t for t, _, _ in transport.agent_chunks if t > cut_at + 0.5)
    late = [t for kind, t, *_ in transport.events if kind == "agent_audio" and cut_at < t < next_reply]
    assert len(late) <= 1, late
    first_reply = agent_segments(recording, 24000)[0]
    played = first_reply[1] - first_reply[0]
    assert played < 6 * 0.8  # it was cut well before its 6 s

    # The conversation keeps only what was heard: fewer frames than were sent (the tiny model runs
    # faster than real time), no more than were played, and the kept text is a prefix of the sent.
    (heard, sent), = stats.cut_replies
    assert heard < sent and heard * 0.08 <= played + 0.02
    assert stats.turns == 2
    session = call.service.session
    kept, sent_text = session.turns[0], stats.texts[0]
    assert sent_text.startswith(kept)


@requires_espeak
async def test_two_concurrent_calls_do_not_interfere(tmp_path, tiny_model):
    one = caller(0.3, synthesize("Hello there.", RATE), 3.0)
    two = caller(0.3, synthesize("Good morning.", RATE), 2.0, synthesize("Are you there?", RATE), 0.2)
    runtime = runtime_for(tmp_path, tiny_model)
    (call_a, rec_a, _), (call_b, rec_b, _) = await asyncio.gather(
        simulate_call(runtime, one, RATE, out_rate=8000, settle_secs=0.5),
        simulate_call(runtime, two, RATE, out_rate=48000, settle_secs=0.5),
    )
    stats_a, stats_b = call_a.stats, call_b.stats
    assert (stats_a.turns, stats_b.turns) == (1, 2)
    assert len(agent_segments(rec_a, 8000)) == 1 and len(agent_segments(rec_b, 48000)) == 2
    assert stats_a.call_id != stats_b.call_id
    assert runtime.metrics.calls["file"] == 2 and runtime.metrics.calls_active == 0
