"""Engine benchmark: streaming latency, step costs, real-time factor, multi-turn drift, voice-prefix reuse.

    .venv/bin/python -m bench.engine                       # tiny preset, defaults
    .venv/bin/python -m bench.engine --device cuda --model FlashLabs/Chroma-4B --json out.json
    .venv/bin/python -m bench.engine --device cuda --preset random-4b --sessions 1,8,32

Concurrency: N sessions answer at once through the model's one scheduler (every reply in flight
advances one frame per tick, as one batch); a late caller joins while N-1 others stream.

Everything runs on one model load (same weights throughout). Each figure is the median of
--repeats runs, after a warm-up reply. Timers are `time.perf_counter`, read after a CUDA
synchronise when the model is on CUDA. This is a benchmark, not a test: it prints a Markdown
table and labels each target as met or not, but never fails on a missed target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from processors.chroma.checkpoint import default_device, default_dtype, load_model
from processors.chroma.codec_stream import StreamingCodecDecoder
from processors.chroma.config import FRAME_SECONDS, LISTEN_RATE, SAMPLE_RATE
from processors.chroma.frame_step import GREEDY, FrameStep
from processors.chroma.generation import (
    ResponseSteps,
    ThinkerStream,
    build_voice_prompt,
    codec_codes,
    prefill_thinker,
)
from processors.chroma.scheduler import FrameScheduler
from processors.chroma.text import processor_inputs

SYSTEM_PROMPT = "You are a helpful voice agent. Answer briefly."
VOICE_TEXT = "Hello, this is the reference recording of my voice for the benchmark."
TTFA_RATIO_TARGET = 0.05  # streaming time to first audio / generate-all-then-decode time
TURN_RATIO_TARGET = 1.2  # time to first audio at turn N / at turn 1
RTF_TARGET = 1.0  # generation wall time / audio seconds: faster than real time
SCALE_TARGET = 8.0  # aggregate frames/s at 16 sessions / at 1 session
SESSION_RTF_TARGET = 0.5  # every session's real-time factor at 16 sessions
JOIN_TARGET = 2.0  # time to first audio of a caller joining 15 streaming ones / alone
STEP_RATIO_TARGET = 0.45  # lean frame step / transformers' modules, one session
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- timing helpers ---------------------------------------------------------------


class Clock:
    """perf_counter that first waits for queued device work (CUDA kernels run asynchronously)."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


# -- inputs -----------------------------------------------------------------------


def make_audio(seconds: float, rate: int, seed: int) -> np.ndarray:
    """A voiced-ish test signal (two tones with vibrato, plus noise): deterministic, not silent."""
    rng = np.random.RandomState(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 20 * np.sin(2 * np.pi * 3 * t) + (10 * seed) % 40
    phase = 2 * np.pi * np.cumsum(f0) / rate
    audio = 0.25 * np.sin(phase) + 0.1 * np.sin(3 * phase) + 0.03 * rng.randn(t.size)
    return audio.astype(np.float32)


def bench_inputs(model, voice_audio: np.ndarray, user_audio: np.ndarray) -> dict:
    """The released processor's tensors for the benchmark's turn: what the session builds internally."""
    return processor_inputs(model, (voice_audio, VOICE_TEXT), user_audio, SYSTEM_PROMPT)


# -- streaming session runs --------------------------------------------------------------


async def _noop_step(session) -> None:
    """Wait until the device worker has finished whatever a cancelled reply left queued."""
    await session.scheduler.run(lambda: None)


async def stream_reply(session, user_audio: np.ndarray, clock: Clock, first_only: bool = False) -> dict:
    """One reply through `session.respond`: time to first audio, wall time, frames, codes."""
    first, frames, codes, pieces = None, 0, [], 0
    started = clock.now()
    async with contextlib.aclosing(session.respond(user_audio)) as chunks:
        async for chunk in chunks:  # chunk.audio is already on the host, so the device is done with it
            if first is None:
                first = time.perf_counter() - started
            frames = chunk.frames[1]
            pieces += chunk.audio.size
            codes.append(chunk.codes)
            if first_only:
                session.cancel()
                break
    wall = time.perf_counter() - started
    if first_only:
        await _noop_step(session)
    return {
        "ttfa_s": first,
        "wall_s": wall,
        "frames": frames,
        "audio_s": pieces / SAMPLE_RATE,
        "codes": torch.cat(codes) if codes else None,
    }


# -- the benchmark ---------------------------------------------------------------------


class EngineBench:
    def __init__(self, model, args):
        self.model = model
        self.args = args
        self.clock = Clock(model.device)
        self.voice = make_audio(args.voice_seconds, SAMPLE_RATE, seed=1)
        self.user = make_audio(args.user_seconds, LISTEN_RATE, seed=2)
        self.results: dict = {}

    def session(self, **kwargs):
        kwargs.setdefault("max_frames", self.args.frames)
        return self.model.new_session(voice=(self.voice, VOICE_TEXT), system_prompt=SYSTEM_PROMPT, **kwargs)

    def log(self, message: str) -> None:
        print(f"  .. {message}", file=sys.stderr, flush=True)

    # warm-up: the first call in a process pays for kernel selection, allocator growth, lazy imports
    def warm_up(self) -> None:
        self.log("warming up")
        for _ in range(2):
            asyncio.run(stream_reply(self.session(max_frames=6), self.user, self.clock))
        inputs = bench_inputs(self.model, self.voice, self.user)
        self.model.decode_codes(self.model.generate_codes(inputs, 6))
        asyncio.run(stream_reply(self.session(max_frames=4, reuse_voice_prompt=False), self.user, self.clock, True))

    def streaming_vs_batch(self) -> None:
        a, n = self.args, self.args.frames
        self.log(f"streaming sessions, {n}-frame replies, chunk_frames 1/2/4")
        ttfa = {1: [], 2: [], 4: []}
        full = []
        for _ in range(a.repeats):
            for cf in (1, 2, 4):
                run = asyncio.run(stream_reply(self.session(chunk_frames=cf), self.user, self.clock, first_only=cf != 2))
                ttfa[cf].append(run["ttfa_s"])
                if cf == 2:
                    full.append(run)
        self.log(f"generate_codes({n}) then decode_codes, same inputs")
        inputs = bench_inputs(self.model, self.voice, self.user)
        batch, batch_gen = [], []
        for _ in range(a.repeats):
            t0 = self.clock.now()
            codes = self.model.generate_codes(inputs, n)
            t1 = self.clock.now()
            audio = self.model.decode_codes(codes)
            t2 = self.clock.now()
            batch.append(t2 - t0)
            batch_gen.append(t1 - t0)
        stream_codes = full[-1]["codes"]
        same = stream_codes is not None and codes.shape[1] == stream_codes.shape[0] and torch.equal(codes[0], stream_codes)
        r = self.results
        r["frames"] = full[-1]["frames"]
        r["ttfa_stream_ms"] = {cf: 1000 * median(v) for cf, v in ttfa.items()}
        r["generate_then_decode_ms"] = 1000 * median(batch)
        r["generate_only_ms"] = 1000 * median(batch_gen)
        r["batch_audio_s"] = audio.shape[-1] / SAMPLE_RATE
        r["ttfa_ratio"] = r["ttfa_stream_ms"][2] / r["generate_then_decode_ms"]
        r["stream_wall_s"] = median(x["wall_s"] for x in full)
        r["stream_audio_s"] = median(x["audio_s"] for x in full)
        r["rtf"] = median(x["wall_s"] / x["audio_s"] for x in full if x["audio_s"] > 0)
        r["stream_codes_equal_batch"] = bool(same)
        r["_codes"] = stream_codes

    def step_costs(self) -> None:
        """Drive `ResponseSteps` directly and time each backbone step, the depth decoder inside it,
        and the thinker decodes it triggers (the thinker runs ahead of the backbone, so its cost is
        shared out per frame)."""
        self.log("per-frame step costs")
        model, n = self.model, self.args.frames
        inputs = bench_inputs(model, self.voice, self.user)
        ids_text = torch.tensor(model.tokenizer.encode(VOICE_TEXT), dtype=torch.long)
        voice = build_voice_prompt(model, ids_text, torch.from_numpy(self.voice))
        steps_ms, decoder, thinker, frames_total = [], 0.0, 0.0, 0
        for _ in range(self.args.repeats):
            with torch.inference_mode(), _timed_calls(self.clock) as timers:
                ids = inputs["thinker_input_ids"]
                features, mask = inputs["thinker_input_features"], inputs["thinker_feature_attention_mask"]
                cache = DynamicCache()
                hidden, token, next_pos = prefill_thinker(model, ids, cache, 0, features, mask)
                stream = ThinkerStream(model, cache, next_pos, hidden, token)
                steps = ResponseSteps(model, voice, stream, n)
                timers.wrap(stream, "_decode_one", "thinker")
                timers.wrap(model, "decode_frame", "decoder")
                timers.reset()
                while not steps.done:
                    t0 = self.clock.now()
                    steps.next_frame()
                    steps_ms.append(1000 * (self.clock.now() - t0))
                frames_total += steps.step
                thinker += timers.total["thinker"]
                decoder += timers.total["decoder"]
        step_total = sum(steps_ms) / 1000
        r = self.results
        r["step_ms_median"] = median(steps_ms)
        r["step_ms_mean"] = 1000 * step_total / frames_total
        r["thinker_ms_per_frame"] = 1000 * thinker / frames_total
        r["decoder_ms_per_frame"] = 1000 * decoder / frames_total
        r["backbone_ms_per_frame"] = 1000 * (step_total - thinker - decoder) / frames_total

        self.log("codec streaming decode per chunk")
        codes = r.pop("_codes")
        codec = StreamingCodecDecoder(model.codec_model)
        r["codec_chunk_ms"] = {}
        for cf in (1, 2, 4):
            times = []
            for _ in range(self.args.repeats):
                codec.reset()
                for start in range(0, codes.shape[0] - cf + 1, cf):
                    chunk = codec_codes(model, codes[start : start + cf]).T.unsqueeze(0)
                    t0 = self.clock.now()
                    codec.decode(chunk)
                    times.append(1000 * (self.clock.now() - t0))
            r["codec_chunk_ms"][cf] = median(times)

    def turns(self) -> None:
        n_turns, cap = self.args.turns, self.args.turn_frames
        self.log(f"{n_turns} turns in one session, replies capped at {cap} frames")
        per_turn = [[] for _ in range(n_turns)]
        for _ in range(self.args.repeats):
            session = self.session(max_frames=cap)

            async def conversation(session=session):
                for turn in range(n_turns):
                    audio = make_audio(1.0, LISTEN_RATE, seed=10 + turn)
                    run = await stream_reply(session, audio, self.clock)
                    per_turn[turn].append(run["ttfa_s"])

            asyncio.run(conversation())
        r = self.results
        r["turn_ttfa_ms"] = [1000 * median(v) for v in per_turn]
        r["turn_ratio"] = r["turn_ttfa_ms"][-1] / r["turn_ttfa_ms"][0]

    def voice_reuse(self) -> None:
        self.log("voice prefix: cached vs rebuilt per reply")
        cached, fresh = [], []
        for _ in range(self.args.repeats):
            run = asyncio.run(stream_reply(self.session(), self.user, self.clock, first_only=True))
            cached.append(run["ttfa_s"])
            run = asyncio.run(stream_reply(self.session(reuse_voice_prompt=False), self.user, self.clock, True))
            fresh.append(run["ttfa_s"])
        r = self.results
        r["ttfa_voice_cached_ms"] = 1000 * median(cached)
        r["ttfa_voice_rebuilt_ms"] = 1000 * median(fresh)

    def lean_step(self) -> None:
        """One session's backbone + depth-decoder step per frame: transformers' modules (the path
        `generate_codes` keeps) against the lean batched step at batch 1, on the same inputs."""
        self.log("frame step: transformers' modules vs the lean step, one session")
        model, n = self.model, self.args.frames
        inputs = bench_inputs(model, self.voice, self.user)
        ids_text = torch.tensor(model.tokenizer.encode(VOICE_TEXT), dtype=torch.long)
        voice = build_voice_prompt(model, ids_text, torch.from_numpy(self.voice))
        step = FrameStep(model, rows=1)
        old, lean, same = [], [], True
        for _ in range(self.args.repeats):
            with torch.inference_mode():
                ids = inputs["thinker_input_ids"]
                features, mask = inputs["thinker_input_features"], inputs["thinker_feature_attention_mask"]
                runs = {}
                for kind in ("old", "lean"):
                    cache = DynamicCache()
                    hidden, token, next_pos = prefill_thinker(model, ids, cache, 0, features, mask)
                    steps = ResponseSteps(model, voice, ThinkerStream(model, cache, next_pos, hidden, token), n)
                    steps.cache = voice.fresh_cache()
                    length = step.pool.load(0, voice.keys_values)
                    codes = []
                    while not steps.done:
                        parts = steps.frame_inputs()
                        if parts is None:
                            break
                        t0 = self.clock.now()
                        if kind == "old":
                            h = model.backbone_forward(parts.unsqueeze(0), steps.cache, None)
                            frame = model.decode_frame(h)[0]
                        else:
                            frame = step.step([parts], [length], [voice.mask], [GREEDY])[0]
                            length += parts.shape[0]
                        (old if kind == "old" else lean).append(1000 * (self.clock.now() - t0))
                        codes.append(frame)
                        steps.accept(frame)
                    runs[kind] = torch.stack(codes)
                same = same and torch.equal(runs["old"], runs["lean"])
        r = self.results
        r["step_old_ms"], r["step_lean_ms"] = median(old), median(lean)
        r["step_ratio"] = r["step_lean_ms"] / r["step_old_ms"]
        r["step_codes_equal"] = bool(same)

    def concurrency(self) -> None:
        """N sessions answering at once; then a late caller joining N-1 streaming ones."""
        frames = self.args.concurrent_frames
        r = self.results
        scheduler = FrameScheduler.for_model(self.model)
        graph_modes = {"on": [True], "off": [False], "both": [True, False]}[self.args.cuda_graphs]
        if self.model.device.type != "cuda":
            graph_modes = [False]
        for graphs in graph_modes:
            scheduler.set_cuda_graphs(graphs)
            rows = {}
            for count in self.args.sessions:
                self.log(f"{count} sessions at once, {frames}-frame replies, CUDA graphs {'on' if graphs else 'off'}")
                if graphs:  # capture outside the measurement: one warm-up round at this batch size
                    asyncio.run(self._concurrent(count, 4))
                rows[count] = asyncio.run(self._concurrent(count, frames))
                rows[count]["cuda_graphs"] = graphs
            if 1 in rows:
                for row in rows.values():
                    row["scale"] = row["frames_per_s"] / rows[1]["frames_per_s"]
            r["concurrency_graphs" if graphs and len(graph_modes) > 1 else "concurrency"] = rows
        scheduler.set_cuda_graphs(graph_modes[0])
        joiners = 16 if 16 in self.args.sessions else max(self.args.sessions)  # the target: 15 streaming
        if joiners > 1:
            self.log(f"a caller joining {joiners - 1} streaming sessions")
            alone = asyncio.run(self._late_joiner(0, frames))
            joined = asyncio.run(self._late_joiner(joiners - 1, frames))
            r["join"] = {"others": joiners - 1, "alone_ms": 1000 * alone, "joined_ms": 1000 * joined,
                         "ratio": joined / alone}

    async def _one(self, seed: int, frames: int, started: asyncio.Event | None = None) -> dict:
        session = self.session(max_frames=frames)
        user = make_audio(self.args.user_seconds, LISTEN_RATE, seed=seed)
        t0, first, count = time.perf_counter(), None, 0
        async with contextlib.aclosing(session.respond(user)) as chunks:
            async for chunk in chunks:
                if first is None:
                    first = time.perf_counter() - t0
                    if started is not None:
                        started.set()
                count = chunk.frames[1]
        return {"ttfa_s": first, "wall_s": time.perf_counter() - t0, "frames": count}

    async def _concurrent(self, count: int, frames: int) -> dict:
        t0 = time.perf_counter()
        runs = await asyncio.gather(*[self._one(100 + i, frames) for i in range(count)])
        wall = time.perf_counter() - t0
        total = sum(x["frames"] for x in runs)
        rtf = [x["wall_s"] / (x["frames"] * FRAME_SECONDS) for x in runs if x["frames"]]
        ttfa = [x["ttfa_s"] for x in runs if x["ttfa_s"] is not None]
        return {"sessions": count, "frames": total, "frames_per_s": total / wall,
                "rtf_median": median(rtf), "rtf_max": max(rtf, default=float("nan")),
                "ttfa_median_ms": 1000 * median(ttfa), "ttfa_max_ms": 1000 * max(ttfa, default=float("nan"))}

    async def _late_joiner(self, others: int, frames: int) -> float:
        """Time to first audio of one caller who starts once `others` sessions are all streaming
        (their replies long enough to outlast the joiner's first audio)."""
        events = [asyncio.Event() for _ in range(others)]
        background = [asyncio.create_task(self._one(200 + i, 4 * frames, events[i])) for i in range(others)]
        for event in events:
            await event.wait()
        joined = await self._one(300, frames)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        return joined["ttfa_s"]

    def run(self) -> dict:
        started = time.perf_counter()
        self.warm_up()
        self.streaming_vs_batch()
        self.step_costs()
        self.lean_step()
        self.turns()
        self.voice_reuse()
        self.concurrency()
        self.results["bench_wall_s"] = time.perf_counter() - started
        return self.results


class _timed_calls(contextlib.AbstractContextManager):
    """Wraps bound methods on instances with timers for the duration of a `with` block."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.total: dict[str, float] = {}
        self._wrapped: list[tuple[object, str]] = []

    def wrap(self, obj, name: str, label: str) -> None:
        inner: Callable = getattr(obj, name)
        self.total.setdefault(label, 0.0)

        def timed(*args, **kwargs):
            t0 = self.clock.now()
            try:
                return inner(*args, **kwargs)
            finally:
                self.total[label] += self.clock.now() - t0

        object.__setattr__(obj, name, timed)  # an instance attribute shadows the method
        self._wrapped.append((obj, name))

    def reset(self) -> None:
        for label in self.total:
            self.total[label] = 0.0

    def __exit__(self, *exc) -> None:
        for obj, name in reversed(self._wrapped):
            object.__delattr__(obj, name)
        self._wrapped.clear()


# -- report ---------------------------------------------------------------------------


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def table(r: dict, args) -> str:
    n, turns = args.frames, args.turns
    rows = []

    def row(name, value, target="", met=""):
        rows.append(f"| {name} | {value} | {target} | {met} |")

    s = r["ttfa_stream_ms"]
    row("frames per reply (streaming, chunk_frames=2)", f"{r['frames']} ({r['stream_audio_s']:.2f} s audio)")
    for cf in (1, 2, 4):
        row(f"time to first audio, streaming, chunk_frames={cf}", f"{s[cf]:.1f} ms")
    row(f"time to first audio, generate_codes({n}) then decode_codes", f"{r['generate_then_decode_ms']:.1f} ms"
        f" (generate {r['generate_only_ms']:.1f} ms)")
    row("TTFA ratio: streaming (chunk_frames=2) / generate-then-decode", f"{r['ttfa_ratio']:.3f}",
        f"<= {TTFA_RATIO_TARGET}", _met(r["ttfa_ratio"] <= TTFA_RATIO_TARGET))
    row("streamed codes == generate_codes codes (greedy)", "yes" if r["stream_codes_equal_batch"] else "no")
    row("step time per frame, median (backbone + decoder + thinker share)", f"{r['step_ms_median']:.2f} ms"
        f" (mean {r['step_ms_mean']:.2f})")
    row("step part: backbone, mean per frame", f"{r['backbone_ms_per_frame']:.2f} ms")
    row("step part: depth decoder, mean per frame", f"{r['decoder_ms_per_frame']:.2f} ms")
    row("step part: thinker share, mean per frame", f"{r['thinker_ms_per_frame']:.2f} ms")
    c = r["codec_chunk_ms"]
    row("codec streaming decode per chunk, chunk_frames=1 / 2 / 4", f"{c[1]:.2f} / {c[2]:.2f} / {c[4]:.2f} ms")
    row(f"real-time factor, streaming {n}-frame reply (wall / audio s)", f"{r['rtf']:.3f}"
        f" ({r['stream_wall_s']:.2f} s for {r['stream_audio_s']:.2f} s)", f"< {RTF_TARGET:g}", _met(r["rtf"] < RTF_TARGET))
    t = r["turn_ttfa_ms"]
    row(f"time to first audio, turn 1 / turn {turns} (one session, {args.turn_frames}-frame replies)",
        f"{t[0]:.1f} / {t[-1]:.1f} ms")
    row(f"TTFA ratio turn {turns} / turn 1", f"{r['turn_ratio']:.2f}x", f"<= {TURN_RATIO_TARGET}x",
        _met(r["turn_ratio"] <= TURN_RATIO_TARGET))
    row("time to first audio, voice prefix cached / rebuilt per reply",
        f"{r['ttfa_voice_cached_ms']:.1f} / {r['ttfa_voice_rebuilt_ms']:.1f} ms"
        f" ({r['ttfa_voice_rebuilt_ms'] / r['ttfa_voice_cached_ms']:.2f}x)",
        "cached faster", _met(r["ttfa_voice_cached_ms"] < r["ttfa_voice_rebuilt_ms"]))
    row("frame step, one session: transformers' modules / lean step (backbone + decoder)",
        f"{r['step_old_ms']:.2f} / {r['step_lean_ms']:.2f} ms ({r['step_ratio']:.2f}x)"
        f"{'' if r['step_codes_equal'] else ' CODES DIFFER'}", f"<= {STEP_RATIO_TARGET}x",
        _met(r["step_ratio"] <= STEP_RATIO_TARGET))
    head = ["| measurement | value | target | met |", "|---|---|---|---|"]
    return "\n".join(head + rows)


def concurrency_table(r: dict, args) -> str:
    rows = ["| sessions | CUDA graphs | aggregate frames/s | x one session | real-time factor median / max |"
            " time to first audio median / max |", "|---|---|---|---|---|---|"]
    measured = list(r.get("concurrency_graphs", {}).items()) + list(r["concurrency"].items())
    for count, c in measured:
        scale = f"{c['scale']:.2f}x" if "scale" in c else ""
        if count == 16 and "scale" in c:
            scale += f" (target >= {SCALE_TARGET:g}x: {_met(c['scale'] >= SCALE_TARGET)})"
        rtf = f"{c['rtf_median']:.2f} / {c['rtf_max']:.2f}"
        if count == 16:
            rtf += f" (target max <= {SESSION_RTF_TARGET}: {_met(c['rtf_max'] <= SESSION_RTF_TARGET)})"
        graphs = "on" if c.get("cuda_graphs") else "off"
        rows.append(f"| {count} | {graphs} | {c['frames_per_s']:.1f} | {scale} | {rtf} |"
                    f" {c['ttfa_median_ms']:.0f} / {c['ttfa_max_ms']:.0f} ms |")
    if "join" in r:
        j = r["join"]
        rows.append("")
        rows.append(f"A caller joining {j['others']} streaming sessions: first audio after {j['joined_ms']:.0f} ms,"
                    f" alone {j['alone_ms']:.0f} ms ({j['ratio']:.2f}x; target <= {JOIN_TARGET:g}x:"
                    f" {_met(j['ratio'] <= JOIN_TARGET)}).")
    return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--preset", choices=["tiny", "random-4b"], default="tiny",
                   help="built-in model preset: tiny, or random-4b (the released dimensions, random weights; for GPUs)")
    p.add_argument("--model", default=None, help="checkpoint folder or Hugging Face id; overrides --preset")
    p.add_argument("--frames", type=int, default=100, help="reply length in frames, 80 ms each (default: 100)")
    p.add_argument("--repeats", type=int, default=5, help="runs per measurement; medians reported (default: 5)")
    p.add_argument("--turns", type=int, default=10, help="turns in the multi-turn measurement (default: 10)")
    p.add_argument("--turn-frames", type=int, default=20, help="reply cap per turn in that measurement (default: 20)")
    p.add_argument("--voice-seconds", type=float, default=3.0, help="reference voice length (default: 3)")
    p.add_argument("--user-seconds", type=float, default=2.0, help="user turn length (default: 2)")
    p.add_argument("--sessions", default="1,2,4,8,16,32",
                   help="concurrent session counts, comma-separated (default: 1,2,4,8,16,32)")
    p.add_argument("--concurrent-frames", type=int, default=50,
                   help="reply length in frames for the concurrency table (default: 50)")
    p.add_argument("--cuda-graphs", choices=["on", "off", "both"], default="both",
                   help="on CUDA: the concurrency table with the depth decoder replayed as CUDA graphs, eager, or both")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    try:
        args.sessions = sorted({int(x) for x in str(args.sessions).split(",") if x.strip()})
    except ValueError:
        p.error(f"--sessions {args.sessions!r}: expected counts separated by commas, e.g. 1,8,32")
    if not args.sessions or min(args.sessions) < 1:
        p.error("--sessions needs counts of at least 1")
    for flag in ("frames", "repeats", "turns", "turn_frames", "concurrent_frames"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.turns < 2:
        p.error("--turns must be at least 2 to compare a later turn with the first")
    if args.device and torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available in this torch build / on this machine")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    source = args.model or args.preset
    model = load_model(source, device=device, dtype=dtype)
    results = EngineBench(model, args).run()

    threads = torch.get_num_threads()
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"# Chroma engine benchmark: {source}")
    print()
    print(f"- model: {source}{' (random miniature: timings only, output is noise)' if model.config.is_tiny else ''}")
    print(f"- device: {device}{gpu}; dtype: {str(dtype).removeprefix('torch.')}; torch {torch.__version__}"
          f" ({threads} CPU threads); python {platform.python_version()}")
    print(f"- reply: {args.frames} frames max; repeats: {args.repeats} (medians); turns: {args.turns};"
          f" benchmark wall time {results['bench_wall_s']:.0f} s")
    print()
    print(table(results, args))
    print()
    print(f"Concurrent sessions ({args.concurrent_frames}-frame replies, all answering at once):")
    print()
    print(concurrency_table(results, args))
    if args.json:
        meta = {"model": source, "device": str(device), "dtype": str(dtype), "torch": torch.__version__,
                "frames": args.frames, "repeats": args.repeats, "turns": args.turns,
                "targets": {"ttfa_ratio": TTFA_RATIO_TARGET, "turn_ratio": TURN_RATIO_TARGET, "rtf": RTF_TARGET}}
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
