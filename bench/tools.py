"""Tool-call benchmark: from a tool's result to the first audio of the answer, and what watching the
thinker's stream for tool calls costs.

    .venv/bin/python -m bench.tools                         # tiny preset, CPU
    .venv/bin/python -m bench.tools --device cuda --repeats 20 --json out.json

Three measurements, one model load:

- **result → first audio, session**: a reply stops at a tool call; `tool_result()` then `respond()`
  continues the turn. Timed from handing the result back to the answer's first audio chunk, per
  thinker lookahead (0, 3, 8 tokens).
- **result → first audio, whole call**: the same through the real pipeline on the in-process
  transport: a flow's Python tool returns, pipecat's function-call machinery broadcasts the result,
  the context aggregator asks for the next reply, the service speaks. Timed from the tool's `return`
  to the service pushing the answer's first audio. Needs espeak-ng for the caller's turns.
- **lookahead overhead**: time to first audio of a plain reply with the tool-call filter watching the
  stream vs. without (the filter holds back only what could start `<tool_call>`), per lookahead, and
  the filter's own cost per token.

The thinker's words are scripted (`ScriptedReasoner`): with random tiny weights nothing else calls a
tool. Figures are medians (and p95 where stated) of --repeats runs. A benchmark, not a test: it never
fails on a number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from bench.engine import DTYPES, make_audio
from processors.chroma.checkpoint import default_device, default_dtype, load_model
from processors.chroma.config import LISTEN_RATE, SAMPLE_RATE
from processors.chroma.generation import ThinkerToken, TokenFilter
from processors.chroma.scripted import Call, Say, ScriptedReasoner
from processors.chroma.tools import ToolCallFilter, tool_call_text

VOICE_TEXT = "Hello, this is the reference recording of my voice for the benchmark."
TOOLS = [{"name": "lookup_order", "description": "Look up an order.",
          "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}}}]
ANSWER = "It shipped."
LOOKAHEADS = (0, 3, 8)


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(np.ceil(q / 100 * len(ordered))) - 1))]


async def first_chunk(session, audio=None) -> tuple[float, int]:
    """Seconds to the first chunk of a reply (then the reply runs to its end), and its frames."""
    started, first, frames = time.perf_counter(), None, 0
    async with contextlib.aclosing(session.respond(audio)) as chunks:
        async for chunk in chunks:
            if first is None:
                first = time.perf_counter() - started
            frames = chunk.frames[1]
    return first, frames


def new_session(model, voice, turns, lookahead, max_frames=40, tools=True):
    reasoner = ScriptedReasoner(model.tokenizer, turns)
    session = model.new_session(voice, "You are a test agent.", lookahead=lookahead, max_frames=max_frames,
                                thinker_stream=reasoner)
    if tools:
        session.set_tools(TOOLS)
    return session


async def result_to_answer(model, voice, user, lookahead: int, repeats: int) -> list[float]:
    times = []
    for i in range(repeats + 1):  # the first is a warm-up
        session = new_session(model, voice, [[Call("lookup_order", {"order_id": "A17"}), Say(ANSWER)]], lookahead)
        await first_chunk(session, user)  # pauses at the call, with nothing said before it
        started = time.perf_counter()
        session.tool_result({"status": "shipped"})
        async with contextlib.aclosing(session.respond()) as chunks:
            async for _chunk in chunks:
                times.append(time.perf_counter() - started)
                break
        if i == 0:
            times.clear()
    return times


async def lookahead_overhead(model, voice, user, lookahead: int, repeats: int) -> dict[str, float]:
    out = {}
    for label, tools in (("filter", True), ("plain", False)):
        samples = []
        for i in range(repeats + 1):
            session = new_session(model, voice, [["Hello there, how can I help?"]], lookahead, tools=tools)
            ttfa, _ = await first_chunk(session, user)
            if i:
                samples.append(ttfa)
        out[label] = statistics.median(samples)
    return out


def filter_cost_per_token(model, tokens: int = 4000) -> float:
    """Seconds per token of ToolCallFilter.push on text with calls mixed in (the tiny byte tokenizer)."""
    text = ("Sure, let me check that for you. " + tool_call_text("lookup_order", {"order_id": "A17"}) + " ") * 40
    ids = model.tokenizer.encode(text)[:tokens]
    dummy = torch.zeros(1, 1)
    pairs = [ThinkerToken(t, dummy, dummy) for t in ids]
    flt = ToolCallFilter(model.tokenizer.decode, None, [model.config.im_end_token_id])
    started = time.perf_counter()
    for pair in pairs:
        flt.push(pair)
    flt.finish()
    plain = TokenFilter()
    base = time.perf_counter()
    for pair in pairs:
        plain.push(pair)
    return ((base - started) - (time.perf_counter() - base)) / len(pairs)


FLOW = """
tools:
  lookup_order:
    description: Look up an order.
    parameters:
      type: object
      properties: {order_id: {type: string}}
    python: bench_tools:lookup_order
    timeout_secs: 5
    fallback: Sorry.
initial_node: start
nodes:
  start:
    respond_immediately: false
    task_messages: [{role: developer, content: Help with orders.}]
    functions:
      - name: lookup_order
"""

TOOL_MODULE = """
import time
RETURNED = []

def lookup_order(order_id=""):
    RETURNED.append(time.perf_counter())
    return {"status": "shipped"}
"""


async def whole_call(model, voice_folder: Path, turns: int) -> list[float] | str:
    """Tool return → the service's first audio of the answer, over `turns` caller turns in one call."""
    from agent.runtime import AgentRuntime
    from agent.spec import load_agent
    from agent.testing.inprocess import InProcessCall
    from agent.testing.speech import SpeechUnavailable, synthesize
    from flows.tools import load_python

    try:
        speech = synthesize("Where is my order?", 16000)
    except SpeechUnavailable as exc:
        return f"skipped: {exc}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "bench_tools.py").write_text(TOOL_MODULE)
        (folder / "flow.yaml").write_text(textwrap.dedent(FLOW))
        (folder / "agent.yaml").write_text(
            f"name: tool bench\nmodel: tiny\nvoice: {voice_folder}\nflow: flow.yaml\n"
            "turn: {detector: silence, silence_secs: 0.4}\nresponse: {max_seconds: 1}\n"
        )
        script = [[Call("lookup_order", {"order_id": "A17"}), Say("Ok.")] for _ in range(turns)]
        runtime = AgentRuntime(load_agent(folder / "agent.yaml"), model=model,
                               reasoner=lambda: ScriptedReasoner(model.tokenizer, script))
        returned = load_python("bench_tools:lookup_order", folder).__globals__["RETURNED"]
        firsts: list[float] = []
        async with InProcessCall(runtime) as line:
            @line.call.service.event_handler("on_first_audio")
            async def _first(_service, _seconds):
                firsts.append(time.perf_counter())

            for _ in range(turns):
                await line.say(speech)
                await line.quiet(settle=0.8, timeout=20)
        # pair each tool return with the first audio that followed it
        return [min(f for f in firsts if f > r) - r for r in returned if any(f > r for f in firsts)]


def run(args) -> dict:
    device = torch.device(args.device) if args.device else default_device()
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    model = load_model("tiny", device=device, dtype=dtype)
    voice = (make_audio(3.0, SAMPLE_RATE, 1), VOICE_TEXT)
    user = make_audio(2.0, LISTEN_RATE, 2)
    results: dict = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "lookahead": {}}
    for k in LOOKAHEADS:
        answer = asyncio.run(result_to_answer(model, voice, user, k, args.repeats))
        overhead = asyncio.run(lookahead_overhead(model, voice, user, k, args.repeats))
        results["lookahead"][k] = {
            "result_to_audio_p50_ms": 1000 * statistics.median(answer),
            "result_to_audio_p95_ms": 1000 * pct(answer, 95),
            "ttfa_filter_ms": 1000 * overhead["filter"],
            "ttfa_plain_ms": 1000 * overhead["plain"],
        }
    results["filter_us_per_token"] = 1e6 * filter_cost_per_token(model)
    if not args.no_call:
        voice_folder = Path(__file__).resolve().parents[1] / "examples" / "voices" / "demo"
        results["whole_call"] = asyncio.run(whole_call(model, voice_folder, args.call_turns))
    return results


def table(r: dict) -> str:
    rows = ["| measurement | lookahead 0 | lookahead 3 | lookahead 8 |", "|---|---:|---:|---:|"]

    def row(name, key):
        cells = " | ".join(f"{r['lookahead'][k][key]:.1f} ms" for k in LOOKAHEADS)
        rows.append(f"| {name} | {cells} |")

    row("tool result → first audio of the answer, p50 (session)", "result_to_audio_p50_ms")
    row("tool result → first audio of the answer, p95 (session)", "result_to_audio_p95_ms")
    row("time to first audio, plain reply, tool-call filter on", "ttfa_filter_ms")
    row("time to first audio, plain reply, no filter", "ttfa_plain_ms")
    rows.append(f"| tool-call filter, cost per thinker token | {r['filter_us_per_token']:.1f} µs | | |")
    call = r.get("whole_call")
    if isinstance(call, list) and call:
        ms = [1000 * x for x in call]
        rows.append(f"| tool return → first audio of the answer, whole call (lookahead 3), p50 / p95 / max "
                    f"over {len(ms)} | {statistics.median(ms):.1f} / {pct(ms, 95):.1f} / {max(ms):.1f} ms | | |")
    elif call is not None:
        rows.append(f"| whole call | {call} | | |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tools", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--repeats", type=int, default=9, help="runs per figure (default: 9)")
    p.add_argument("--call-turns", type=int, default=6, help="caller turns in the whole-call measurement (default: 6)")
    p.add_argument("--no-call", action="store_true", help="skip the whole-call measurement")
    p.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.call_turns < 1:
        p.error("--repeats and --call-turns must be at least 1")
    started = time.perf_counter()
    results = run(args)
    print("# Tool-call benchmark: tiny preset")
    print()
    print(f"- device: {results['device']}; dtype: {results['dtype']}; torch {torch.__version__} "
          f"({torch.get_num_threads()} CPU threads); python {platform.python_version()}; "
          f"repeats {args.repeats}; wall time {time.perf_counter() - started:.0f} s")
    print()
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
