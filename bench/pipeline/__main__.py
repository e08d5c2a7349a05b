"""Pipeline benchmark: concurrent phone calls side by side with pipecat, barge-in reaction, response latency.

    .venv/bin/python -m bench.pipeline                      # everything, about 9 minutes on 2 cores
    .venv/bin/python -m bench.pipeline --quick              # smoke run (1 and 10 calls, 10 s windows), ~3 min
    .venv/bin/python -m bench.pipeline --json out.json      # also write the raw numbers
    .venv/bin/python -m bench.pipeline --only concurrency --calls 1,10,25,50 --baseline-vads webrtc,silero
    .venv/bin/python -m bench.pipeline --only concurrency --calls 75,100 --with-gc-ablation   # + an ablation
    .venv/bin/python -m bench.pipeline server --port 8766   # our Twilio /ws server alone (for profiling)

Three parts, each printing a Markdown table:

1. Concurrency. Two Twilio Media Streams servers run as subprocesses on loopback ports, one after the
   other for each call count, under the same load generator (`pipecat_baseline.py load`: N callers
   sending 20 ms mu-law frames at real time, espeak-ng speech then silence, repeated): pipecat's
   idiomatic server (`pipecat_baseline.py server`, its ToneBot answering each turn with 2 s of tone)
   and ours (`server` below: pipecat's websocket transport and Twilio serializer in front of our
   per-call pipeline from agent/runtime.py, with the Chroma engine replaced by `StandInModel`, which
   answers each turn with the same 2 s tone at once, so no model cost at all). The load generator
   reads each server's CPU from /proc and splits outbound media into replies per caller turn.
2. Barge-in reaction time, in process on the file transport in real time (8 kHz caller, 8 kHz agent
   audio): the caller speaks, the agent starts a long reply, the caller cuts in. Measured on the call's
   clock from the push of the first caller frame holding barge-in speech to the write of the last agent
   audio frame. With the stand-in engine and with the tiny model, and with a 16 kHz caller (no
   resampler before the VAD) for comparison; the VAD is replayed offline to split the time.
3. Response latency as the caller feels it: end of the caller's speech (espeak-ng sentence, where it was
   placed) to the first agent audio frame written, with the tiny model, Smart Turn vs. fixed silence;
   split into end-of-turn wait, the engine's own time to first audio, and output.

Timers are the event loop's monotonic clock (file transport) or `time.monotonic` (load generator).
This is a benchmark, not a test: targets are labelled met or not, and nothing fails on a miss.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from .common import BASELINE_TOOL, PHONE_RATE, REPLY_SECS, Speech, log
from .load import CONCURRENCY_NOTES, cmd_server, concurrency_tables, run_concurrency
from .simulated import BARGE_IN_NOTES, LATENCY_NOTES, barge_in_table, latency_table, run_simulated

# -- main ----------------------------------------------------------------------------------------------


PARTS = ("concurrency", "barge-in", "latency")


def cmd_run(args) -> int:
    args.calls = (
        [int(x) for x in str(args.calls).split(",")]
        if args.calls
        else ([1, 10] if args.quick else [1, 10, 25, 50, 75, 100])
    )
    args.seconds = args.seconds or (10.0 if args.quick else 30.0)
    args.runs = args.runs or (3 if args.quick else 5)
    args.only = args.only.split(",") if args.only else list(PARTS)
    args.baseline_vads = args.baseline_vads.split(",") if args.baseline_vads else ["webrtc"]
    for part in args.only:
        if part not in PARTS:
            raise SystemExit(f"--only {part}: expected some of {','.join(PARTS)}")
    if not BASELINE_TOOL.exists() and "concurrency" in args.only:
        raise SystemExit(f"the baseline tool is not at {BASELINE_TOOL}")
    folder = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    speech = Speech(folder)
    t0 = time.monotonic()
    results: dict = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "quick": args.quick,
        "work_folder": str(folder),
    }
    if "concurrency" in args.only:
        results["concurrency"] = run_concurrency(args, folder, speech)
    if "barge-in" in args.only or "latency" in args.only:
        results["simulated"] = asyncio.run(run_simulated(args, folder, speech))
    results["wall_secs"] = round(time.monotonic() - t0, 1)

    print(
        f"# Pipeline benchmark ({'quick' if args.quick else 'full'} run, {os.cpu_count()} CPUs, "
        f"{results['wall_secs']:.0f} s)\n"
    )
    if "concurrency" in results:
        c = results["concurrency"]
        print(f"## Concurrent Twilio calls ({c['seconds']:g} s window, same load generator for both)\n")
        print(concurrency_tables(c))
        print(CONCURRENCY_NOTES.format(secs=c["seconds"]))
    sim = results.get("simulated", {})
    if "barge_in" in sim:
        print("## Barge-in reaction time (file transport, real time, agent audio at 8 kHz)\n")
        print(barge_in_table(sim))
        print(BARGE_IN_NOTES)
    if "latency" in sim:
        print(
            f"## Response latency as the caller feels it (tiny model, {sim['caller_rate']} Hz caller unless noted)\n"
        )
        print(latency_table(sim))
        print(LATENCY_NOTES.format(gap=args.latency_gap))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        log(f"raw numbers in {args.json}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.pipeline",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd")

    run = sub.add_parser("run", help="the benchmark (the default)")
    s = sub.add_parser("server", help="our Twilio /ws server on the stand-in engine (what `run` starts)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--vad", choices=["webrtc", "silero"], default="webrtc")
    s.add_argument(
        "--silence-secs",
        type=float,
        default=0.2,
        help="silence detector's silence_secs (0.2: end on VAD stop)",
    )
    s.add_argument("--reply-secs", type=float, default=REPLY_SECS)
    s.add_argument("--log-level", default="WARNING")
    s.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="ablation: skip the gc.freeze() that `chroma-agent serve` does after start-up",
    )
    s.set_defaults(func=cmd_server)

    for p in (ap, run):
        p.add_argument(
            "--quick", action="store_true", help="smoke run: 1 and 10 calls, 10 s windows, fewer runs"
        )
        p.add_argument("--json", default="", metavar="FILE", help="write the raw numbers here")
        p.add_argument(
            "--calls",
            default="",
            help="call counts, comma-separated (default 1,10,25,50,75,100; 1, 10 and 50 always run, "
            "the others stop for a server once it has failed at fewer calls)",
        )
        p.add_argument("--seconds", type=float, default=0.0, help="measured window per load run (default 30)")
        p.add_argument(
            "--baseline-vads", default="", help="pipecat servers to compare: webrtc,silero (default webrtc)"
        )
        p.add_argument("--runs", type=int, default=0, help="barge-in runs per engine (default 5)")
        p.add_argument(
            "--caller-rate", type=int, default=PHONE_RATE, help="caller audio rate in the simulated calls"
        )
        p.add_argument("--latency-gap", type=float, default=2.5, help="silence after each caller sentence")
        p.add_argument("--only", default="", help=f"some of {','.join(PARTS)}")
        p.add_argument(
            "--with-gc-ablation",
            action="store_true",
            help="also run our server without serve's gc.freeze() (an ablation, not the runtime as is)",
        )
        p.add_argument(
            "--no-retry",
            dest="retry",
            action="store_false",
            help="do not rerun a load run that failed by a brief stall",
        )
        p.set_defaults(func=cmd_run)
    args = ap.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
