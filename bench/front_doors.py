"""Front-door benchmark: calls carried by 1, 2 and 3 call servers on this machine behind the shipped front
doors (HAProxy from deploy/haproxy.cfg for Twilio, Kamailio from deploy/kamailio.cfg for SIP), the output
gaps a caller hears, and what the front doors add to call set-up, in milliseconds.

    .venv/bin/python -m bench.front_doors                              # 1, 2, 3 servers, 6 calls each
    .venv/bin/python -m bench.front_doors --servers 1,2 --calls-per-server 4 --json out.json
    .venv/bin/python -m bench.front_doors server --agent A.yaml --port P   # one server alone

Each server is `chroma-agent serve`'s app in its own process with the engine replaced by the pipeline
benchmark's stand-in (each reply the same 2 s tone, at once), as in bench/phone, so the figures are the
servers' and front doors' own cost. Per server count N: N servers, HAProxy in front, N x calls-per-server
Twilio stand-in callers at once (signed webhook and media stream through HAProxy), each asking twice and
hearing both replies out; reported: calls answered, replies heard, output gaps over 40 ms and the longest.
Then, on all servers: INVITE -> 200 OK (SIPp, 1 ms resolution) sent straight to a server vs. through
Kamailio, and the voice webhook's time straight to a server vs. through HAProxy; medians and p95.
Nothing fails on a miss; the targets (no gap over 40 ms) are labelled met or not.
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
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import urlencode

import httpx

from agent.testing.front_doors import CallServer, HAProxy, Kamailio, SippRun, free_port

from .phone.common import GAP_LIMIT_SECS
from .phone.twilio import gap_lengths
from .pipeline.common import BARGE_SENTENCES, PHONE_RATE, REPLY_SECS, VOICE, Speech, log, ms, percentile

AUTH_TOKEN = "bench-front-doors-auth-token"
ASK_AT = 0.5
CALL_SECS = 12.0  # ask, hear the 2 s reply, ask again, hear it out
SECOND_ASK_AT = 6.0
LATENCY_SAMPLES = 20

AGENT = """name: front doors
model: tiny
voice: {voice}
max_sessions: 200
turn:
  detector: silence
  silence_secs: 0.5
transports:
  webrtc:
    enabled: false
  twilio:
    enabled: true
    public_url: {public}
    auth_token: {token}
    max_calls: 200
  sip:
    enabled: true
    port: {{sip_port}}
    rtp_ports: [{{rtp_first}}, {{rtp_last}}]
    max_calls: 200
"""


# -- the server --------------------------------------------------------------------------------------


def cmd_server(args) -> int:
    import gc

    import uvicorn
    from loguru import logger

    from agent.runtime import AgentRuntime
    from agent.server import create_app
    from agent.spec import load_agent

    from .pipeline.common import StandInModel

    logger.remove()
    logger.add(sys.stderr, level=args.log_level)
    runtime = AgentRuntime(load_agent(args.agent), model=StandInModel(reply_secs=args.reply_secs))
    app = create_app(runtime)
    gc.collect()
    gc.freeze()  # as `chroma-agent serve` does
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", ws_ping_interval=None)
    return 0


async def start_servers(folder: Path, count: int, public: str, reply_secs: float) -> list[CallServer]:
    servers = []
    for i in range(count):
        sub = folder / f"server-{i}"
        yaml = AGENT.format(voice=VOICE, public=public, token=AUTH_TOKEN)
        server = CallServer(sub, yaml, rtp_ports=200)
        server.command = [
            sys.executable, "-m", "bench.front_doors", "server", "--agent", str(server.agent_path),
            "--port", str(server.port), "--reply-secs", str(reply_secs),
        ]  # fmt: skip
        servers.append(server)
    try:
        for server in servers:
            server.start()
        for server in servers:
            await asyncio.to_thread(server.wait_ready, 120)
        for server in servers:  # a server's first call pays for first-use set-up; the runs measure the rest
            await warm_up(server, public)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


async def warm_up(server: CallServer, public: str) -> None:
    from agent.testing.twilio_caller import TwilioCaller

    _, stream, call_sid = await webhook(server.url, public)
    if stream is None:
        raise RuntimeError(f"server on {server.port} refused its warm-up call:\n{server.log()[-2000:]}")
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    caller = TwilioCaller(
        f"ws://127.0.0.1:{server.port}/twilio/media", AUTH_TOKEN, sign_url=stream.get("url"),
        parameters=params, call_sid=call_sid,
    )  # fmt: skip
    await caller.run(seconds=1.0)


# -- Twilio callers through HAProxy -----------------------------------------------------------------


async def webhook(base: str, public: str) -> tuple[float, ET.Element | None, str]:
    """POST the voice webhook as Twilio does; (seconds it took, the <Stream> or None, the call SID)."""
    from agent.testing.twilio_caller import fetch_voice_twiml, sid

    call_sid = sid("CA")
    t0 = time.perf_counter()
    r = await fetch_voice_twiml(base, AUTH_TOKEN, public_base=public, form={"CallSid": call_sid, "From": "+15550100100"})
    took = time.perf_counter() - t0
    stream = ET.fromstring(r.text).find("Connect/Stream") if r.status_code == 200 else None
    return took, stream, call_sid


async def timed_webhook(client: httpx.AsyncClient, base: str, public: str) -> tuple[float, bool]:
    """One signed voice webhook on a kept-alive client: (seconds to its answer, whether it opened a stream)."""
    from twilio.request_validator import RequestValidator

    from agent.testing.twilio_caller import sid

    form = {"CallSid": sid("CA"), "From": "+15550100100"}
    signature = RequestValidator(AUTH_TOKEN).compute_signature(public + "/twilio/voice", form)
    headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature}
    t0 = time.perf_counter()
    r = await client.post(base + "/twilio/voice", content=urlencode(form), headers=headers)
    took = time.perf_counter() - t0
    return took, r.status_code == 200 and "<Stream" in r.text


async def one_call(haproxy: HAProxy, speech: Speech, index: int) -> dict:
    from agent.testing.twilio_caller import TwilioCaller

    _, stream, call_sid = await webhook(haproxy.url, haproxy.url)
    if stream is None:
        return {"failed": "webhook refused"}
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    caller = TwilioCaller(
        f"ws://127.0.0.1:{haproxy.port}/twilio/media", AUTH_TOKEN, sign_url=stream.get("url"),
        parameters=params, call_sid=call_sid,
    )  # fmt: skip
    ask = speech.samples(BARGE_SENTENCES[index % len(BARGE_SENTENCES)][0], PHONE_RATE)
    task = asyncio.create_task(caller.run(seconds=CALL_SECS))
    await asyncio.sleep(ASK_AT)
    caller.say(ask)
    await asyncio.sleep(SECOND_ASK_AT - ASK_AT)
    caller.say(ask)
    timeline = await task
    return {"failed": None, "replies": len(timeline.replies()), "gaps": gap_lengths(timeline.gaps())}


async def carried(folder: Path, count: int, per_server: int, speech: Speech, reply_secs: float) -> dict:
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    servers = await start_servers(folder / f"{count}-servers", count, public, reply_secs)
    haproxy = HAProxy(folder / f"{count}-haproxy", [s.port for s in servers], port=port)
    try:
        haproxy.start()
        before = [s.calls("twilio") for s in servers]  # the warm-up calls
        calls = count * per_server
        log(f"{count} server(s): {calls} Twilio calls through HAProxy")

        async def placed(i: int) -> dict:
            await asyncio.sleep(2.0 * i / calls)  # callers arrive over 2 s
            try:
                return await one_call(haproxy, speech, i)
            except Exception as e:  # reported, not raised
                return {"failed": f"{type(e).__name__}: {e}"}

        results = await asyncio.gather(*(placed(i) for i in range(calls)))
        per = [s.calls("twilio") - b for s, b in zip(servers, before, strict=True)]
    finally:
        haproxy.stop()
        for server in servers:
            server.stop()
    ok = [r for r in results if not r["failed"]]
    gaps = [g for r in ok for g in r["gaps"]]
    return {
        "servers": count, "calls": calls, "answered": len(ok), "per_server": per,
        "replies": sum(r["replies"] for r in ok), "replies_expected": 2 * calls, "gaps": gaps,
        "failed": [r["failed"] for r in results if r["failed"]][:3],
    }  # fmt: skip


# -- what the front doors add ------------------------------------------------------------------------


async def added_latency(folder: Path, count: int, reply_secs: float, samples: int) -> dict:
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    servers = await start_servers(folder / "latency-servers", count, public, reply_secs)
    kamailio = Kamailio(folder / "latency-kamailio", [s.sip_port for s in servers], probe_seconds=1)
    haproxy = HAProxy(folder / "latency-haproxy", [s.port for s in servers], port=port)
    out: dict = {}
    try:
        kamailio.start()
        haproxy.start()
        # one warm-up call each way, then the measured ones, one at a time
        for name, target in (("invite_direct", servers[0].sip_port), ("invite_kamailio", kamailio.port)):
            SippRun(folder / f"{name}-warm", target, calls=1, hold_ms=100).start().finish()
            run = await asyncio.to_thread(
                SippRun(folder / name, target, calls=samples, rate=5, hold_ms=100).start().finish
            )
            out[name] = [x / 1000 for x in run.invite_ok_ms]
            out[name + "_failed"] = run.failed
        # One HTTP client, one kept-alive connection each way, alternating: the two see the same load.
        targets = {"webhook_direct": servers[0].url, "webhook_haproxy": haproxy.url}
        out.update({name: [] for name in targets})
        async with httpx.AsyncClient() as client:
            for i in range(samples + 1):
                for name, base in targets.items():
                    took, answered = await timed_webhook(client, base, public)
                    if answered and i:  # the first of each warms the connection
                        out[name].append(took)
    finally:
        haproxy.stop()
        kamailio.stop()
        for server in servers:
            server.stop()
    return out


# -- tables ------------------------------------------------------------------------------------------


def carried_table(rows: list[dict]) -> str:
    lines = [
        "| servers | calls at once | answered | calls per server | replies heard / expected | gaps > 40 ms | max gap (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        over = sum(1 for g in r["gaps"] if g > GAP_LIMIT_SECS)
        worst = max(r["gaps"], default=0.0)
        met = "met" if worst <= GAP_LIMIT_SECS else "missed"
        lines.append(
            f"| {r['servers']} | {r['calls']} | {r['answered']} | {' / '.join(map(str, r['per_server']))} "
            f"| {r['replies']} / {r['replies_expected']} | {over} ({met}) | {ms(worst)} |"
        )
    return "\n".join(lines)


def latency_table(lat: dict) -> str:
    def cell(key):
        values = lat.get(key, [])
        return f"{ms(percentile(values, 50), 1)} / {ms(percentile(values, 95), 1)}" if values else "–"

    def added(direct, front):
        a, b = lat.get(direct, []), lat.get(front, [])
        return ms(percentile(b, 50) - percentile(a, 50), 1) if a and b else "–"

    return "\n".join([
        "| set-up step | straight to a server p50 / p95 (ms) | through the front door p50 / p95 (ms) | added p50 (ms) |",
        "|---|---|---|---|",
        f"| SIP INVITE → 200 OK (Kamailio) | {cell('invite_direct')} | {cell('invite_kamailio')} | {added('invite_direct', 'invite_kamailio')} |",
        f"| Twilio voice webhook (HAProxy) | {cell('webhook_direct')} | {cell('webhook_haproxy')} | {added('webhook_direct', 'webhook_haproxy')} |",
    ])  # fmt: skip


async def _run(args) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="bench-front-doors-"))
    speech = Speech(folder)
    results: dict = {"machine": platform.platform(), "cpus": len(os.sched_getaffinity(0)), "carried": []}
    for count in args.servers:
        results["carried"].append(await carried(folder, count, args.calls_per_server, speech, args.reply_secs))
    results["latency"] = await added_latency(folder, max(args.servers), args.reply_secs, args.latency_samples)
    return results


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["server"]:
        p = argparse.ArgumentParser(prog="python -m bench.front_doors server")
        p.add_argument("--agent", required=True)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--reply-secs", type=float, default=REPLY_SECS)
        p.add_argument("--log-level", default="WARNING")
        return cmd_server(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(prog="python -m bench.front_doors", description=__doc__.split("\n")[0])
    p.add_argument("--servers", default="1,2,3", help="comma-separated server counts (default 1,2,3)")
    p.add_argument("--calls-per-server", type=int, default=6)
    p.add_argument("--latency-samples", type=int, default=LATENCY_SAMPLES)
    p.add_argument("--reply-secs", type=float, default=REPLY_SECS)
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = p.parse_args(argv)
    args.servers = [int(x) for x in args.servers.split(",")]
    results = asyncio.run(_run(args))
    print(f"\nmachine: {results['machine']}, {results['cpus']} CPUs (stand-in engine)\n")
    print(carried_table(results["carried"]))
    print()
    print(latency_table(results["latency"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
