"""Phone benchmark: N concurrent calls over Twilio Media Streams and over SIP/RTP against one server.

    .venv/bin/python -m bench.phone                       # N = 10 and 50, 30 s per run, about 6 minutes
    .venv/bin/python -m bench.phone --calls 10 --seconds 15 --json out.json
    .venv/bin/python -m bench.phone server --port P --sip-port S    # the server alone

The server is `chroma-agent serve`'s app (agent/server.py: the Twilio routes and the SIP server) in a
subprocess, with the Chroma engine replaced by the pipeline benchmark's stand-in (each reply is the same
2 s tone at once), so the figures are the framework's own cost: transports, VAD, turn-taking, pacing.

- Twilio: N stand-in callers (agent/testing/twilio_caller.py: signed upgrade, 20 ms mu-law frames
  at real time, the server's media played on a 20 ms clock, marks echoed after playback, `clear`
  honoured) ask, listen to the whole reply, ask again and cut in 0.6 s into the reply.
- SIP: N - 2 SIPp calls (PCMU speech looped over RTP, held for the run) and 2 probe calls
  (transports/sip/caller.py) that time, at the wire, reply pacing and barge-in to RTP stopped.

Reported per run: server CPU per call (share of one core), replies, output gaps (the target: none over
40 ms; pipecat's Twilio path carried about 20 calls, ../shared/docs/pipecat-baseline.md), reply
latency, barge-in from the caller's speech onset to `clear` received / RTP stopped (target: the VAD
start window, 0.2 s, plus 40 ms) and, for Twilio, the mark round trip (mark received to echo sent,
that is the audio queued at the caller's end). Targets are labelled met or not; nothing fails on a miss.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
from pathlib import Path

from ..pipeline.common import REPLY_SECS, VAD_START_SECS, Speech, log, ms, percentile
from .common import GAP_LIMIT_SECS, PhoneServer
from .server import add_server_args, cmd_server
from .sip import run_sip
from .twilio import CALL_SECS, run_twilio

BARGE_TARGET = VAD_START_SECS + 0.040


def _pct(values, p):
    return ms(percentile(values, p))


def _met(value, target) -> str:
    if value is None:
        return "–"
    return "met" if value <= target else "missed"


def twilio_table(runs: list[dict]) -> str:
    rows = [
        "| calls | replies heard | gaps > 40 ms | max gap (ms) | reply latency p50 (ms) | barge-in → clear p50 / p95 (ms) | mark round trip p50 / p95 (ms) | CPU per call (% core) | bad input |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        gaps = r["gaps"]
        over = sum(1 for g in gaps if g > GAP_LIMIT_SECS)
        barge = r["barge_in"]
        rows.append(
            f"| {r['calls']} | {r['replies']} | {over} ({_met(max(gaps, default=0), GAP_LIMIT_SECS)}) | {ms(max(gaps, default=0))} "
            f"| {_pct(r['reply_latency'], 50)} | {_pct(barge, 50)} / {_pct(barge, 95)} ({_met(percentile(barge, 95), BARGE_TARGET)}) "
            f"| {_pct(r['mark_rtt'], 50)} / {_pct(r['mark_rtt'], 95)} | {100 * r['cpu_per_call']:.1f} | {r.get('failed', 0)} |"
        )
    return "\n".join(rows)


def sip_table(runs: list[dict]) -> str:
    rows = [
        "| calls (SIPp + probes) | SIPp exit | probe replies | gaps > 40 ms | max gap (ms) | reply latency p50 (ms) | barge-in → RTP stopped p50 / max (ms) | CPU per call (% core) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        probes = r["probes"]
        gaps = [g for p in probes for g in p["gaps"]]
        barge = [b for p in probes for b in p["barge_in"]]
        latency = [x for p in probes for x in p["reply_latency"]]
        over = sum(1 for g in gaps if g > GAP_LIMIT_SECS)
        failed = [p["failed"] for p in probes if p["failed"]]
        rows.append(
            f"| {r['calls']} ({r['sipp_calls']} + {len(probes)}) | {r['sipp_exit']} | {sum(p['replies'] for p in probes)}"
            f"{' (' + '; '.join(failed) + ')' if failed else ''} | {over} | {ms(max(gaps, default=0))} | {_pct(latency, 50)} "
            f"| {_pct(barge, 50)} / {ms(max(barge, default=None))} ({_met(max(barge, default=None), BARGE_TARGET)}) "
            f"| {100 * r['cpu_per_call']:.1f} |"
        )
    return "\n".join(rows)


async def _run(args) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="bench-phone-"))
    speech = Speech(folder)
    results = {"machine": platform.platform(), "cpus": len(__import__("os").sched_getaffinity(0)), "twilio": [], "sip": []}
    for calls in args.calls:
        with PhoneServer(folder, reply_secs=args.reply_secs) as server:
            if "twilio" in args.parts:
                log(f"Twilio: {calls} calls for {args.seconds:.0f} s")
                results["twilio"].append(await run_twilio(server, calls, args.seconds, speech))
            if "sip" in args.parts:
                log(f"SIP: {calls} calls for {args.seconds:.0f} s")
                results["sip"].append(await run_sip(server, calls, args.seconds, speech, folder))
    return results


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["server"]:
        p = argparse.ArgumentParser(prog="python -m bench.phone server")
        add_server_args(p)
        return cmd_server(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(prog="python -m bench.phone", description=__doc__.split("\n")[0])
    p.add_argument("--calls", default="10,50", help="comma-separated call counts (default 10,50)")
    p.add_argument("--seconds", type=float, default=30.0, help="length of each run")
    p.add_argument("--parts", default="twilio,sip", help="twilio, sip or both")
    p.add_argument("--reply-secs", type=float, default=REPLY_SECS)
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = p.parse_args(argv)
    args.calls = [int(x) for x in args.calls.split(",")]
    args.parts = set(args.parts.split(","))
    if "twilio" in args.parts and args.seconds + 2.0 < CALL_SECS:
        # each Twilio slot only places calls that end within the run (2 s of grace): none would be placed
        p.error(f"--seconds {args.seconds:g}: one Twilio call takes {CALL_SECS:g} s; give at least {CALL_SECS - 2:g}")
    results = asyncio.run(_run(args))
    if results["twilio"]:
        print("\n### Twilio Media Streams\n\n" + twilio_table(results["twilio"]))
    if results["sip"]:
        print("\n### SIP/RTP\n\n" + sip_table(results["sip"]))
    print(f"\nMachine: {results['machine']}, {results['cpus']} CPUs. Barge-in target {ms(BARGE_TARGET)} ms.")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
