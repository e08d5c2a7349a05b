"""Parts 2 and 3: barge-in reaction and response latency on simulated calls (file transport)."""

from __future__ import annotations

import asyncio
import math
import sys
from pathlib import Path

import numpy as np

from .common import (
    BARGE_IN_MARGIN_SECS,
    BARGE_SENTENCES,
    LATENCY_SENTENCES,
    LATENCY_TARGET_SECS,
    PHONE_RATE,
    VAD_START_SECS,
    Speech,
    StandInModel,
    agent_file,
    log,
    loud_span,
    median,
    ms,
    percentile,
)

# -- parts 2 and 3: simulated calls on the file transport ---------------------------------------------------


class _Probe:
    """Times on the call's clock: each caller frame pushed into the pipeline, and user-turn events."""

    def __init__(self, call, transport):
        self.clock = transport.clock
        self.pushes: list[float] = []  # push time of caller frame i (each frame_ms long)
        self.turn_started: list[float] = []
        self.turn_stopped: list[float] = []
        self.first_audio: list[float] = []
        inp = transport.input()
        original = inp.push_audio_frame

        async def push_audio_frame(frame):
            self.pushes.append(self.clock.now())
            return await original(frame)

        inp.push_audio_frame = push_audio_frame
        user = call.aggregators.user()
        user.add_event_handler("on_user_turn_started", lambda *_: self.turn_started.append(self.clock.now()))
        user.add_event_handler("on_user_turn_stopped", lambda *_: self.turn_stopped.append(self.clock.now()))
        call.service.add_event_handler("on_first_audio", lambda *_: self.first_audio.append(self.clock.now()))


async def _run_file_call(runtime, caller: np.ndarray, rate: int, until: float):
    """One call on the file transport until `until` seconds on its clock; -> (call, transport, probe)."""
    from transports.file import FileCallTransport

    transport = FileCallTransport(caller, rate, output_rate=PHONE_RATE, in_rate=rate)
    call = runtime.new_call(transport)
    probe = _Probe(call, transport)

    async def stop_at_deadline():
        await transport.caller_done.wait()
        await transport.clock.sleep_until(until)
        await call.cancel(reason="bench: done")

    watcher = asyncio.create_task(stop_at_deadline())
    try:
        await asyncio.wait_for(call.run(), timeout=until + 30)
    finally:
        watcher.cancel()
    return call, transport, probe


def _silence(secs: float, rate: int) -> np.ndarray:
    return np.zeros(int(round(secs * rate)), np.int16)


def vad_replay(caller: np.ndarray, rate: int, spec, frame_ms: int = 20) -> list[tuple[bool, str]]:
    """The call's VAD replayed offline on the same audio: per caller frame, as the file transport pushes
    it (at the rate the pipeline listens at), whether an analysis frame completed during it counted as speech
    (confidence and volume), and the VAD state after it."""
    from processors.audio import StreamResampler
    from processors.vad import make_vad_analyzer

    v = spec.vad
    vad = make_vad_analyzer(
        v.analyzer,
        aggressiveness=v.aggressiveness,
        frame_ms=v.frame_ms,
        confidence=v.confidence,
        start_secs=v.start_secs,
        stop_secs=v.stop_secs,
        min_volume=v.min_volume,
    )
    listen = rate if rate in (8000, 16000) else 16000  # as agent.simulate and phone transports listen
    vad.set_sample_rate(listen)
    resampler = StreamResampler(rate, listen)
    scores: list[tuple[float, float]] = []
    confidence, volume = vad.voice_confidence, vad._get_smoothed_volume

    def scored_confidence(buffer):
        scores.append((confidence(buffer), 0.0))
        return scores[-1][0]

    def scored_volume(buffer):
        scores[-1] = (scores[-1][0], volume(buffer))
        return scores[-1][1]

    vad.voice_confidence, vad._get_smoothed_volume = scored_confidence, scored_volume
    per = rate * frame_ms // 1000
    out = []
    for i in range(0, caller.size, per):
        scores.clear()
        state = vad._run_analyzer(resampler.process(caller[i : i + per]))
        speech = any(c >= v.confidence and vol >= v.min_volume for c, vol in scores)
        out.append((speech, state.name))
    return out


async def barge_in_runs(runtime, speech: Speech, rate: int, runs: int, label: str) -> list[dict]:
    """The caller asks, the agent starts a long reply, the caller cuts in; one dict per run."""
    out = []
    frame_secs = 0.02
    for k in range(runs):
        first_text, cut_text = BARGE_SENTENCES[k % len(BARGE_SENTENCES)]
        first, cut = speech.samples(first_text, rate), speech.samples(cut_text, rate)
        gap = 1.6 + 0.037 * k  # the agent has been talking ~1 s; vary the phase against 20 ms frames
        parts = [_silence(0.3, rate), first, _silence(gap, rate)]
        cut_offset = sum(p.size for p in parts) / rate
        caller = np.concatenate(parts + [cut, _silence(2.0, rate)])
        cut_start = cut_offset + loud_span(cut, rate)[0]
        call, transport, probe = await _run_file_call(runtime, caller, rate, until=cut_start + 2.0)
        frame_index = int(cut_start // frame_secs)
        if frame_index >= len(probe.pushes):
            out.append({"run": k, "error": "barge-in frame never pushed"})
            continue
        t_in = probe.pushes[frame_index]
        audio_times = [t for kind, t in transport.events if kind == "agent_audio"]
        chunk_secs = transport.agent_chunks[0][2].size / PHONE_RATE if transport.agent_chunks else 0.02
        talking = [t for t in audio_times if t < t_in]
        interruptions = [t for kind, t in transport.events if kind == "interruption" and t >= t_in]
        if not talking or t_in - talking[-1] > 0.1:
            out.append({"run": k, "error": "the agent was not talking when the caller cut in"})
            continue
        # the cut reply's last frame: frames after t_in until the first pause of more than 100 ms
        last = talking[-1]
        for t in audio_times:
            if t >= t_in:
                if t - last > 0.1:
                    break
                last = t
        trace = vad_replay(caller, rate, runtime.spec)
        first_speech = next((i for i in range(frame_index, len(trace)) if trace[i][0]), None)
        speaking = next((i for i in range(frame_index, len(trace)) if trace[i][1] == "SPEAKING"), None)
        out.append(
            {
                "run": k,
                "engine": label,
                "cut_in_speech_at": round(cut_start, 4),
                "vad_first_speech_frame_after": None
                if first_speech is None
                else round((first_speech - frame_index) * frame_secs, 3),
                "vad_decides_after": None
                if speaking is None
                else round((speaking - frame_index) * frame_secs, 3),
                "frame_pushed_at": round(t_in, 4),
                "push_late_ms": round((t_in - frame_index * frame_secs) * 1000, 2),
                "turn_started_after": round(
                    min((t for t in probe.turn_started if t >= t_in), default=math.nan) - t_in, 4
                ),
                "interruption_at_output_after": round(interruptions[0] - t_in, 4) if interruptions else None,
                "last_agent_frame_after": round(last - t_in, 4),
                "agent_silent_after": round(last + chunk_secs - t_in, 4),
                "output_chunk_ms": round(chunk_secs * 1000, 1),
                "barge_ins": call.stats.barge_ins,
                "cut_replies": call.stats.cut_replies,
            }
        )
        r = out[-1]
        log(
            f"barge-in {label} {rate} Hz run {k}: last agent frame {r['last_agent_frame_after'] * 1000:.0f} ms after the"
            f" cut-in frame (interruption at output after {ms(r['interruption_at_output_after'])} ms)"
        )
    return out


async def latency_runs(runtime, speech: Speech, rate: int, gap_secs: float, label: str) -> list[dict]:
    """The caller says each sentence and waits `gap_secs`; one dict per turn."""
    parts, ends = [_silence(0.3, rate)], []
    t = 0.3
    for text in LATENCY_SENTENCES:
        x = speech.samples(text, rate)
        ends.append(t + loud_span(x, rate)[1])
        parts += [x, _silence(gap_secs, rate)]
        t += (x.size / rate) + gap_secs
    caller = np.concatenate(parts)
    call, transport, probe = await _run_file_call(runtime, caller, rate, until=t)
    audio = [t for kind, t in transport.events if kind == "agent_audio"]
    out = []
    ttfa = list(call.stats.ttfa)
    for k, end in enumerate(ends):
        nxt = ends[k + 1] if k + 1 < len(ends) else math.inf
        first = next((a for a in audio if end <= a < nxt), None)
        stopped = next((s for s in probe.turn_stopped if end - 0.5 <= s < nxt), None)
        started_audio = next((s for s in probe.first_audio if end <= s < nxt), None)
        out.append(
            {
                "turn": k,
                "detector": label,
                "speech_end": round(end, 4),
                "latency": round(first - end, 4) if first is not None else None,
                "turn_end_after": round(stopped - end, 4) if stopped is not None else None,
                "engine_ttfa": round(ttfa[k], 4) if k < len(ttfa) else None,
                "first_chunk_to_output": round(first - started_audio, 4)
                if first is not None and started_audio
                else None,
            }
        )
    log(
        f"latency {label}: " + ", ".join(f"{ms(r['latency'])}" for r in out) + " ms; turns "
        f"{call.stats.turns}, engine ttfa " + ", ".join(ms(x) for x in ttfa) + " ms"
    )
    return out


async def run_simulated(args, folder: Path, speech: Speech) -> dict:
    from loguru import logger

    from agent.runtime import AgentRuntime
    from agent.spec import load_agent

    logger.remove()
    logger.add(sys.stderr, level="ERROR")
    res: dict = {"caller_rate": args.caller_rate}
    rate = args.caller_rate
    tiny = None

    def tiny_model():
        nonlocal tiny
        if tiny is None:
            from processors.chroma.checkpoint import load_model

            log("loading the tiny model")
            tiny = load_model("tiny", device="cpu")
        return tiny

    if "barge-in" in args.only:
        res["resampler_holdback"] = await resampler_holdback()
        res["barge_in"] = {}
        spec = load_agent(agent_file(folder, name="barge-stand-in", detector="silence", silence_secs=0.5))
        runtime = AgentRuntime(spec, model=StandInModel(reply_secs=6.0))
        res["barge_in"][f"stand-in, {rate} Hz caller"] = await barge_in_runs(
            runtime, speech, rate, args.runs, "stand-in"
        )
        if rate != 16000:  # the same with a 16 kHz caller, for comparison
            res["barge_in"]["stand-in, 16000 Hz caller"] = await barge_in_runs(
                runtime, speech, 16000, args.runs, "stand-in"
            )
        if not args.quick:
            spec = load_agent(
                agent_file(folder, name="barge-tiny", detector="silence", silence_secs=0.5, max_seconds=6)
            )
            runtime = AgentRuntime(spec, model=tiny_model())
            await _warm_up(runtime, speech)
            res["barge_in"][f"tiny, {rate} Hz caller"] = await barge_in_runs(
                runtime, speech, rate, args.runs, "tiny"
            )
    if "latency" in args.only:
        res["latency"] = {}
        configs = [
            ("smart_turn", "smart_turn", 0.8, rate),
            ("silence 0.8 s", "silence", 0.8, rate),
            ("silence 0.5 s", "silence", 0.5, rate),
        ]
        if rate != 16000:
            configs.append(("smart_turn, 16000 Hz caller", "smart_turn", 0.8, 16000))
        if args.quick:
            configs = configs[:2]
        for label, detector, secs, caller_rate in configs:
            spec = load_agent(
                agent_file(
                    folder,
                    name=f"latency-{detector}-{secs}",
                    detector=detector,
                    silence_secs=secs,
                    max_seconds=1,
                )
            )
            runtime = AgentRuntime(spec, model=tiny_model())
            await _warm_up(runtime, speech)
            res["latency"][label] = await latency_runs(runtime, speech, caller_rate, args.latency_gap, label)
    return res


async def resampler_holdback(frame_ms: int = 20, seconds: float = 3.0) -> list[dict]:
    """How much audio a streaming resampler holds back, fed 20 ms frames of noise: after each push,
    (input pushed so far - output delivered so far) in seconds. The audio reaches the VAD that late."""
    from pipecat.audio.utils import create_stream_resampler

    from processors.audio import StreamResampler

    rng = np.random.default_rng(0)
    out = []
    for in_rate, out_rate, where in (
        (8000, 16000, "caller in: phone 8 kHz → 16 kHz"),
        (48000, 16000, "caller in: WebRTC 48 kHz → 16 kHz"),
        (24000, 8000, "agent out: 24 kHz → phone 8 kHz"),
    ):
        ours = StreamResampler(in_rate, out_rate)
        theirs = create_stream_resampler()
        per = in_rate * frame_ms // 1000
        for name, push in (
            ("ours (processors.audio.StreamResampler, soxr MQ)", ours.process),
            ("pipecat's (create_stream_resampler, soxr VHQ)", None),
        ):
            pushed = delivered = 0
            held = []
            for i in range(int(seconds * 1000 / frame_ms)):
                x = (rng.standard_normal(per) * 3000).astype(np.int16)
                y = push(x) if push else await theirs.resample(x.tobytes(), in_rate, out_rate)
                pushed += per
                delivered += len(y) // 2
                if i * frame_ms >= 500:
                    held.append(pushed / in_rate - delivered / out_rate)
            out.append(
                {
                    "where": where,
                    "resampler": name,
                    "held_mean": round(float(np.mean(held)), 4),
                    "held_max": round(float(np.max(held)), 4),
                    "held_min": round(float(np.min(held)), 4),
                }
            )
    return out


async def _warm_up(runtime, speech: Speech) -> None:
    """One reply outside the measurement: the voice prompt is built on a model's first session."""
    from processors.audio_io import to_float

    session = runtime.new_session()
    audio = to_float(speech.samples(LATENCY_SENTENCES[0], 16000))
    async for _ in session.respond(audio):
        pass
    session.cancel()
    if "smart_turn" in str(runtime.spec.turn.detector):
        from processors.turn import shared_smart_turn_session

        shared_smart_turn_session()


def barge_in_table(res: dict) -> str:
    target = VAD_START_SECS + BARGE_IN_MARGIN_SECS
    out = [
        "| engine | runs | reaction: cut-in frame pushed → last agent frame written, median / p95 / max (ms) "
        "| VAD (replayed): first speech frame / start decided, median (ms) "
        "| in the call: user turn started / interruption at output, median (ms) "
        "| agent silent (last frame played out), median (ms) | target (VAD start + 40 ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, all_runs in res.get("barge_in", {}).items():
        runs = [r for r in all_runs if "error" not in r]
        errors = [r for r in all_runs if "error" in r]
        reaction = [r["last_agent_frame_after"] for r in runs]
        p50, p95 = median(reaction), percentile(reaction, 95)
        met = p95 is not None and p95 <= target + 1e-9
        out.append(
            f"| {name} | {len(runs)}{f' ({len(errors)} failed)' if errors else ''} "
            f"| {ms(p50)} / {ms(p95)} / {ms(max(reaction) if reaction else None)} "
            f"| {ms(median([r['vad_first_speech_frame_after'] for r in runs]))} / {ms(median([r['vad_decides_after'] for r in runs]))} "
            f"| {ms(median([r['turn_started_after'] for r in runs]))} / {ms(median([r['interruption_at_output_after'] for r in runs]))} "
            f"| {ms(median([r['agent_silent_after'] for r in runs]))} "
            f"| ≤ {target * 1000:.0f} ms: {'met' if met else '**not met**'} (p95) |"
        )
    if res.get("resampler_holdback"):
        out += [
            "",
            "| streaming resampler, 20 ms frames | which | audio held back after each push, mean / max (ms) |",
            "| --- | --- | ---: |",
        ]
        for r in res["resampler_holdback"]:
            out.append(f"| {r['where']} | {r['resampler']} | {ms(r['held_mean'])} / {ms(r['held_max'])} |")
    return "\n".join(out)


def latency_table(res: dict) -> str:
    out = [
        "| end of turn | turns | latency: end of speech → first agent frame written, median / p95 / max (ms) "
        "| of which: end-of-turn wait, median (ms) | engine TTFA (tiny), median (ms) "
        "| first chunk → written, median (ms) | target < 500 ms (median) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for label, turns in res.get("latency", {}).items():
        lat = [t["latency"] for t in turns]
        answered = [x for x in lat if x is not None]
        p50 = median(answered)
        out.append(
            f"| {label} | {len(answered)}/{len(turns)} answered "
            f"| {ms(p50)} / {ms(percentile(answered, 95))} / {ms(max(answered) if answered else None)} "
            f"| {ms(median([t['turn_end_after'] for t in turns]))} | {ms(median([t['engine_ttfa'] for t in turns]))} "
            f"| {ms(median([t['first_chunk_to_output'] for t in turns]))} "
            f"| {'met' if p50 is not None and p50 < LATENCY_TARGET_SECS and len(answered) == len(turns) else '**not met**'}"
            f" ({sum(x < LATENCY_TARGET_SECS for x in answered)}/{len(turns)} turns under 500 ms) |"
        )
    return "\n".join(out)


BARGE_IN_NOTES = """
- Caller (espeak-ng, resampled to the caller rate) asks, the agent answers with a 6 s reply (stand-in:
  tone at once; tiny: generated in real time), and about 1 s into it the caller cuts in with a second
  sentence. Start: the push of the first 20 ms caller frame holding the cut-in's speech (its onset,
  10 ms blocks within 40 dB of the loudest) into the pipeline. End: the write of the last agent audio
  frame before the agent went quiet (the file transport writes a frame when it starts playing and
  returns once it has played, a device without playout buffer). "agent silent" adds that frame's length.
- What the time is made of: the VAD start window (start_secs 0.2 s = 10 consecutive 20 ms speech frames,
  so the decision comes with the 10th, 180 ms after the first), the frames before the onset counts as
  speech (webrtcvad, min_volume), pipecat's hops from the VAD decision
  to the output (the replayed decision and the call's turn start agree within ~2 ms), and the output
  frame that was playing when the interruption arrived (the next one is dropped).
- The pipeline listens at the caller's rate (8 kHz here, as phone transports do): no streaming resampler
  sits in front of the VAD (soxr's 8 → 16 kHz stream holds back 64 ms on average, 118 ms at worst; see
  the resampler table). The service resamples each finished turn to 16 kHz for the engine.
- "VAD (replayed)": the same caller audio through the same VAD offline, frame by frame:
  when the first frame counts as speech, and when the VAD's start is decided, after the cut-in frame.
"""

LATENCY_NOTES = """
- The caller says five espeak-ng sentences with {gap:g} s of silence after each; the tiny model answers each
  (max_seconds 1). Latency: end of the caller's speech (where the sentence was placed, its last 10 ms
  block within 40 dB of the loudest) to the first agent audio frame the output writes.
- end-of-turn wait: end of speech → the user aggregator's turn stop (VAD stop_secs 0.2 s, then the
  silence detector's remaining wait or Smart Turn's verdict; if Smart Turn says "not finished", the
  fallback waits silence_secs 0.8 s more). engine TTFA: the service's own time from turn end to the
  session's first chunk (call.stats.ttfa). first chunk → written: the service's first chunk to the
  output's first write (resampling 24 → 8 kHz, pipecat's hops).
"""
