"""Part 1: concurrent Twilio calls, our server and pipecat's side by side under one load generator."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import WebSocket  # at module level: the /ws handler's annotation is resolved from these globals

from .common import (
    BASELINE_TOOL,
    CALLER_SILENCE_SECS,
    CALLER_SPEECH_SECS,
    LOAD_SENTENCE,
    PHONE_RATE,
    REPLY_SECS,
    REQUIRED_CALLS,
    ROOT,
    Speech,
    StandInModel,
    agent_file,
    log,
    percentile,
)

# -- part 1: our Twilio server (subcommand `server`) ----------------------------------------------------


def build_server_app(args):
    """FastAPI app: `/ws` takes Twilio Media Streams (as pipecat_baseline.py's server does) and runs our
    per-call pipeline on the stand-in engine; GET `/stats` answers what the load generator reads."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from loguru import logger
    from pipecat.runner.utils import parse_telephony_websocket
    from pipecat.serializers.twilio import TwilioFrameSerializer
    from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport

    from agent.runtime import AgentRuntime
    from agent.spec import load_agent
    from transports.line import TransportLine

    logger.remove()
    logger.add(sys.stderr, level=args.log_level)

    folder = Path(tempfile.mkdtemp(prefix="bench-pipeline-server-"))
    spec = load_agent(
        agent_file(
            folder, name="twilio-server", vad=args.vad, detector="silence", silence_secs=args.silence_secs
        )
    )
    runtime = AgentRuntime(spec, model=StandInModel(reply_secs=args.reply_secs))

    state = {
        "started": 0,
        "finished": 0,
        "active": 0,
        "replies": 0,
        "errors": 0,
        "lag": deque(maxlen=20000),
        "lag_max": 0.0,
    }
    # (seconds since the last /stats?reset=1, pause seconds) per collection, by generation: each one
    # stops the event loop. The load generator resets at the start of its measured window.
    gc_pauses = {0: [], 1: [], 2: []}
    gc_started = [0.0]
    reset_at = [time.perf_counter()]

    def gc_timer(phase, info):
        now = time.perf_counter()
        if phase == "start":
            gc_started[0] = now
        else:
            gc_pauses[info["generation"]].append((gc_started[0] - reset_at[0], now - gc_started[0]))

    gc.callbacks.append(gc_timer)

    async def lag_monitor():
        period = 0.05
        while True:
            t = time.monotonic()
            await asyncio.sleep(period)
            lag = time.monotonic() - t - period
            state["lag"].append(lag)
            state["lag_max"] = max(state["lag_max"], lag)

    @asynccontextmanager
    async def lifespan(_app):
        task = asyncio.create_task(lag_monitor())
        yield
        task.cancel()

    if not args.no_gc_freeze:
        # as `chroma-agent serve` does: what is loaded by now (torch, transformers, pipecat) leaves the
        # collector's full scans
        gc.collect()
        gc.freeze()

    app = FastAPI(lifespan=lifespan)

    @app.get("/stats")
    async def stats(reset: int = 0):
        lags = list(state["lag"])
        out = {
            "pid": os.getpid(),
            "vad": f"{args.vad} (ours)",
            "turn": f"silence {args.silence_secs:g} s",
            "no_observers": True,
            "gc_freeze": not args.no_gc_freeze,
            "gc_frozen_objects": gc.get_freeze_count(),
            "started": state["started"],
            "finished": state["finished"],
            "active": state["active"],
            "replies": state["replies"] + sum(c.stats.turns for c in runtime.calls.values()),
            "errors": state["errors"],
            "loop_lag_p50_ms": round(percentile(lags, 50) * 1000, 2) if lags else None,
            "loop_lag_p99_ms": round(percentile(lags, 99) * 1000, 2) if lags else None,
            "loop_lag_max_ms": round(state["lag_max"] * 1000, 2),
            "loop_lag_samples": len(lags),
            "gc_pauses": {
                f"gen{g}": [[round(t, 3), round(d * 1000, 1)] for t, d in p] for g, p in gc_pauses.items()
            },
        }
        if reset:
            state["lag"].clear()
            state["lag_max"] = 0.0
            for p in gc_pauses.values():
                p.clear()
            reset_at[0] = time.perf_counter()
        return out

    @app.websocket("/ws")
    async def twilio_ws(websocket: WebSocket):
        await websocket.accept()
        transport_type, call_data = await parse_telephony_websocket(websocket)
        if transport_type != "twilio":
            await websocket.close(code=1008)
            return
        serializer = TwilioFrameSerializer(
            stream_sid=call_data["stream_id"],
            call_sid=call_data["call_id"],
            params=TwilioFrameSerializer.InputParams(auto_hang_up=False),
        )
        transport = FastAPIWebsocketTransport(
            websocket=websocket,
            params=FastAPIWebsocketParams(
                audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False, serializer=serializer
            ),
        )
        call = runtime.new_call(TransportLine(transport, kind="twilio", in_rate=PHONE_RATE, out_rate=PHONE_RATE))

        @transport.event_handler("on_client_disconnected")
        async def _caller_left(_transport, _ws):
            await call.cancel(reason="caller hung up")

        state["started"] += 1
        state["active"] += 1
        try:
            await call.run()
        except Exception as exc:  # keep serving the other calls
            state["errors"] += 1
            logger.error(f"call {call_data['call_id']}: {exc!r}")
        finally:
            state["active"] -= 1
            state["finished"] += 1
            state["replies"] += call.stats.turns

    return app


def cmd_server(args) -> int:
    import uvicorn

    app = build_server_app(args)
    print(json.dumps({"pid": os.getpid(), "port": args.port}), flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", ws_ping_interval=None)
    return 0


# -- part 1: the side-by-side run ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


@dataclass
class Server:
    label: str  # e.g. "pipecat 1.14 (webrtcvad)"
    framework: str  # "pipecat" or "ours"
    vad: str
    command: list[str]
    port: int
    log_path: Path
    proc: subprocess.Popen | None = None
    reports: dict[int, dict] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def stats_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stats"

    def start(self) -> None:
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.label} server exited ({self.proc.returncode}); see {self.log_path}"
                )
            with contextlib.suppress(Exception):
                http_json(self.stats_url, timeout=1.0)
                return
            time.sleep(0.3)
        raise RuntimeError(f"{self.label} server not ready after {timeout:.0f} s; see {self.log_path}")

    def wait_idle(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if http_json(self.stats_url).get("active") == 0:
                    return True
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()


def ours_command(port: int, *extra: str) -> list[str]:
    """Our benchmark server's command line (`python -m bench.pipeline server`), webrtcvad, on `port`."""
    return [sys.executable, "-m", "bench.pipeline", "server", "--port", str(port), "--vad", "webrtc", *extra]


def make_servers(args, folder: Path) -> list[Server]:
    py = sys.executable
    servers = []

    def ours() -> Server:
        port = free_port()
        command = ours_command(port)
        return Server(
            "chroma-agents (webrtcvad)", "ours", "webrtc", command, port, folder / "server-ours-webrtc.log"
        )

    for vad in args.baseline_vads:
        port = free_port()
        servers.append(
            Server(
                f"pipecat 1.14 ({'webrtcvad' if vad == 'webrtc' else 'Silero'})",
                "pipecat",
                vad,
                [
                    py,
                    str(BASELINE_TOOL),
                    "server",
                    "--port",
                    str(port),
                    "--vad",
                    vad,
                    "--tone-secs",
                    str(REPLY_SECS),
                ],
                port,
                folder / f"server-pipecat-{vad}.log",
            )
        )
        if vad == "webrtc":  # ours next to its like
            servers.append(ours())
    if "webrtc" not in args.baseline_vads:
        servers.append(ours())
    if args.with_gc_ablation:
        port = free_port()
        servers.append(
            Server(
                "chroma-agents (webrtcvad), no gc.freeze() [ablation]",
                "ours-ablation",
                "webrtc",
                ours_command(port, "--no-gc-freeze"),
                port,
                folder / "server-ours-webrtc-no-gc-freeze.log",
            )
        )
    return servers


def load_command(tool: Path, url: str, calls: int, seconds: float, caller_wav: Path, report: Path) -> list[str]:
    """The load generator's command line: `calls` callers on `url` for `seconds`, each speaking and
    pausing as the benchmark's callers do, its report written to `report`."""
    return [
        sys.executable, str(tool), "load", "--url", url, "--calls", str(calls), "--seconds", str(seconds),
        "--caller-wav", str(caller_wav), "--speech-secs", str(CALLER_SPEECH_SECS),
        "--silence-secs", str(CALLER_SILENCE_SECS), "--tone-secs", str(REPLY_SECS), "--report", str(report),
    ]  # fmt: skip


def run_load(server: Server, calls: int, seconds: float, caller_wav: Path, folder: Path) -> dict:
    report = folder / f"load-{server.framework}-{server.vad}-{calls}.json"
    cmd = load_command(BASELINE_TOOL, server.url, calls, seconds, caller_wav, report)
    limit = seconds + calls / 20.0 + 90
    t0 = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"error": f"load generator did not finish within {limit:.0f} s"}
    wall = time.monotonic() - t0
    if not report.exists():
        tail = (done.stderr or done.stdout)[-2000:]
        return {"error": f"no report (exit {done.returncode}): {tail}"}
    summary = json.loads(report.read_text())["summary"]
    with contextlib.suppress(Exception):  # ours only: the collector's pauses inside the measured window
        pauses = http_json(server.stats_url).get("gc_pauses")
        if pauses is not None:
            window = summary["window_secs"]
            summary["server_gc_pauses_ms"] = {
                gen: [d for t, d in p if t <= window] for gen, p in pauses.items()
            }
    summary["load_exit_status"] = done.returncode
    summary["load_wall_secs"] = round(wall, 1)
    return summary


def carried(s: dict) -> bool:
    """Every expected reply complete and no gap in what the caller hears: the load generator's model of
    Twilio's playout queue never ran dry (a chunk arriving late but while earlier audio still plays is
    no gap to the caller; such chunks are counted as "late gaps" and shown, not failed)."""
    return bool(
        s.get("replies_expected")
        and s["replies_completed"] == s["replies_expected"]
        and s["playout_underruns"] == 0
        and not s["connect_failures"]
        and not s["calls_closed_early"]
    )


def brief_stall(s: dict) -> bool:
    """Not carried, but only just: every reply complete and under 1 s of gaps in all calls together.
    On a shared machine that is often a host stall (the load generator is late too); worth a retry."""
    return bool(
        s.get("replies_expected")
        and s["replies_completed"] == s["replies_expected"]
        and 0 < s["playout_underrun_secs"] < 1.0
    )


def run_concurrency(args, folder: Path, speech: Speech) -> dict:
    caller_wav = speech.wav(LOAD_SENTENCE)
    servers = make_servers(args, folder)
    results = {"calls": args.calls, "seconds": args.seconds, "caller_wav_text": LOAD_SENTENCE, "servers": []}
    try:
        for s in servers:
            log(f"concurrency: starting {s.label} server on port {s.port}")
            s.start()
        for s in servers:
            s.wait_ready()
        failed_at: dict[str, int] = {}
        for n in args.calls:
            for s in servers:
                if n not in REQUIRED_CALLS and s.label in failed_at and n > failed_at[s.label]:
                    log(
                        f"concurrency: {n} calls against {s.label} skipped: it already failed at {failed_at[s.label]}"
                    )
                    s.reports[n] = {"skipped": f"failed at {failed_at[s.label]} calls"}
                    continue
                if not s.wait_idle():
                    log(f"concurrency: {s.label} still has active calls from the last run")
                log(f"concurrency: {n} calls x {args.seconds:g} s against {s.label} ...")
                r = s.reports[n] = run_load(s, n, args.seconds, caller_wav, folder)
                if args.retry and "error" not in r and not carried(r) and brief_stall(r):
                    log(
                        f"  {r['playout_underruns']} underruns ({r['playout_underrun_secs']} s), load generator up to"
                        f" {r['load_gen_send_late_ms']['max']} ms late: once more, to tell a host stall from a limit"
                    )
                    s.wait_idle()
                    first = r
                    r = s.reports[n] = run_load(s, n, args.seconds, caller_wav, folder)
                    r["first_try"] = first
                if "error" in r or not carried(r):
                    failed_at.setdefault(s.label, n)
                if "error" in r:
                    log(f"  error: {r['error']}")
                else:
                    log(
                        f"  cpu {r['server_cpu_pct_of_all_cores']}% of 2 cores, {r['cpu_secs_per_call_sec']} cpu-s/call-s,"
                        f" replies {r['replies_completed']}/{r['replies_expected']}, late gaps"
                        f" {r['late_gaps_over_chunk_plus_40ms']}, underruns {r['playout_underruns']},"
                        f" latency p50 {r['latency_ms']['p50']} ms"
                    )
    finally:
        for s in servers:
            s.stop()
    for s in servers:
        results["servers"].append(
            {
                "label": s.label,
                "framework": s.framework,
                "vad": s.vad,
                "reports": {str(n): r for n, r in s.reports.items()},
            }
        )
    return results


def gc_cell(r: dict) -> str:
    pauses = r.get("server_gc_pauses_ms")
    if pauses is None:
        return "–"
    gen2 = pauses.get("gen2", [])
    return f"{len(gen2)} / {max(gen2, default=0):.0f}"


def concurrency_tables(res: dict) -> str:
    out = []
    out.append(
        "| framework | calls | CPU (of 2 cores) | main thread (of 1 core) | CPU-s per call-second "
        "| replies complete | late gaps / underruns | output gap p99 / max (ms) | reply latency p50 / p99 (ms) "
        "| loop lag p99 / max (ms) | full GC pauses: count / max (ms) | load generator late, max (ms) "
        "| RSS per call (MB) | carried |"
    )
    out.append(
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    )
    for n in res["calls"]:
        for s in res["servers"]:
            r = s["reports"].get(str(n))
            if r is None:
                continue
            if "skipped" in r:
                out.append(f"| {s['label']} | {n} | not run ({r['skipped']}) | | | | | | | | | | | no |")
                continue
            if "error" in r:
                out.append(f"| {s['label']} | {n} | error: {r['error'][:80]} | | | | | | | | | | | no |")
                continue
            lag = r["server_loop_lag_ms"]
            verdict = "yes" if carried(r) else "**no**"
            if "first_try" in r:
                f = r["first_try"]
                verdict += (
                    f" (2nd try; the 1st had {f['playout_underruns']} underruns, {f['playout_underrun_secs']} s,"
                    f" load generator up to {f['load_gen_send_late_ms']['max']} ms late)"
                )
            out.append(
                f"| {s['label']} | {n} | {r['server_cpu_pct_of_all_cores']:.0f} % "
                f"| {r['server_main_thread_pct_of_one_core']:.0f} % | {r['cpu_secs_per_call_sec']:.4f} "
                f"| {r['replies_completed']}/{r['replies_expected']} "
                f"| {r['late_gaps_over_chunk_plus_40ms']} / {r['playout_underruns']} "
                f"| {r['gap_ms']['p99']} / {r['gap_ms']['max']} "
                f"| {r['latency_ms']['p50']} / {r['latency_ms']['p99']} "
                f"| {lag.get('loop_lag_p99_ms')} / {lag.get('loop_lag_max_ms')} "
                f"| {gc_cell(r)} | {r['load_gen_send_late_ms']['max']} | {r['server_rss_mb']['per_call']} | {verdict} |"
            )
    # ratios, ours against each baseline
    ours = next((s for s in res["servers"] if s["framework"] == "ours"), None)
    if ours:
        out.append("")
        out.append(
            "| compared with | calls | CPU-s per call-second, pipecat / ours | carried calls (of those tried), pipecat → ours |"
        )
        out.append("| --- | ---: | ---: | --- |")

        def most_carried(server):
            ok = [
                int(n)
                for n, r in server["reports"].items()
                if "error" not in r and "skipped" not in r and carried(r)
            ]
            return max(ok) if ok else 0

        for s in res["servers"]:
            if s["framework"] != "pipecat":
                continue
            for n in res["calls"]:
                a, b = s["reports"].get(str(n)), ours["reports"].get(str(n))
                if not a or not b or any(k in x for x in (a, b) for k in ("error", "skipped")):
                    continue
                ratio = (
                    a["cpu_secs_per_call_sec"] / b["cpu_secs_per_call_sec"]
                    if b["cpu_secs_per_call_sec"]
                    else None
                )
                out.append(
                    f"| {s['label']} | {n} | {ratio:.2f}x | {'yes' if carried(a) else 'no'} → {'yes' if carried(b) else 'no'} |"
                )
            pa, pb = most_carried(s), most_carried(ours)
            ratio = f"{pb / pa:.1f}x" if pa else "pipecat carried none"
            out.append(
                f"| {s['label']} | most carried | | {pa} → {pb} ({ratio}; only the call counts tried) |"
            )
    return "\n".join(out)


CONCURRENCY_NOTES = """
- Both servers take Twilio Media Streams on `/ws` through pipecat's `parse_telephony_websocket`,
  `FastAPIWebsocketTransport` and `TwilioFrameSerializer` (8 kHz mu-law), and answer each caller turn
  with 2 s of 440 Hz tone at 24 kHz (pipecat: its ToneBot in 40 ms frames; ours: the stand-in engine
  in 160 ms chunks, as Chroma streams with chunk_frames 2), so both resample to 8 kHz and encode; no
  model cost on either side. Callers: 1.5 s of espeak-ng speech, 3 s of silence, repeated, 20 ms
  frames at real time, measured over {secs:g} s with all calls streaming.
- pipecat: `pipecat_baseline.py server` as documented in pipecat-baseline.md (VADProcessor +
  UserTurnProcessor, VAD at 8 kHz, pipecat's default observers). Ours: agent/call.py's call
  pipeline (user aggregator with VAD and end of turn, ChromaS2SService, output, PlayoutTracker,
  assistant aggregator; no observers), VAD at 16 kHz (the serializer resamples 8 → 16 kHz), webrtcvad
  mode 2, 20 ms frames, start/stop 0.2 s, confidence 0.7, min volume 0.6 as the baseline, plus our
  steady-tone rejection and RMS volume meter; the turn ends 0.2 s after speech (silence detector,
  silence_secs 0.2) as the baseline's speech timeout 0 after VAD stop.
- CPU: the server process (all threads) from /proc over the window; main thread apart (one Python
  process is bound by its GIL). The load generator shares the 2 cores with the server.
- full GC pauses: Python's generation-2 collections in our server during the window (timed with
  gc.callbacks); each stops the event loop, so every call's audio. pipecat's server does not report
  them (–).
- carried: every expected reply complete (>= 95 % of its audio, before the caller speaks again) and no
  gap the caller hears (underruns: the load generator's model of Twilio's playout queue ran dry).
  "late gaps" (a chunk more than its length + 40 ms after the previous one) are shown, not failed: with
  audio still queued at the phone they are not heard. A run that fails by less than 1 s of underruns
  with every reply complete is run once more (a stall of this shared host shows as the load generator
  being late too); both tries are shown. Counts other than 1, 10 and 50 stop for a server once it failed.
- reply latency: end of the caller's speech (last speech frame sent) to the first reply media received.
"""
