"""Engine service benchmark: what serving the engine over gRPC costs, and what sharing it buys.

    .venv/bin/python -m bench.engine_service                      # both parts, a few minutes on 2 cores
    .venv/bin/python -m bench.engine_service --quick              # smoke settings
    .venv/bin/python -m bench.engine_service --only overhead --sessions 1,16,32

1. **Overhead** (tiny model, CPU): N sessions answer a turn at once, in this process (the model's
   scheduler here) and through `chroma-agent engine` in a process of its own on loopback. Time to
   first audio from the call's side both ways, and per chunk what the service adds: from the moment
   the engine process's consumer has the chunk (where an in-process call would have it) to the moment
   the call server's session yields it, on the host's one monotonic clock; and the call server's CPU
   per chunk (this process's, the engine being elsewhere). Target: at most 5 ms added per chunk
   (median) at 16 sessions.
2. **Call servers** (stand-in engine): one engine service answering every turn with bench.pipeline's
   2 s tone, and 1 or 2 call-server processes (bench.pipeline's Twilio server, its engine being the
   service) under pipecat_baseline.py's load generator, the calls split evenly; and, to weigh them
   against, bench.pipeline's server with the same stand-in in process. "Carried": every reply
   complete and no gap heard, in every server. Needs espeak-ng and pipecat_baseline.py.

It prints Markdown tables and labels the target met or not; it never fails on a miss.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHUNK_TARGET_MS = 5.0
TARGET_SESSIONS = 16
SYSTEM_PROMPT = "You are a helpful voice agent."


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1000:.1f}"


# -- an engine process -------------------------------------------------------------------------------


class EngineProcess:
    """`chroma-agent engine --model tiny` on a free loopback port, for the length of a `with`."""

    def __init__(self, max_sessions: int, log_path: Path):
        from bench.pipeline.load import free_port

        self.port = free_port()
        self.url = f"grpc://127.0.0.1:{self.port}"
        self.max_sessions = max_sessions
        self.log_path = log_path

    def __enter__(self) -> str:
        from agent.engine_command import tiny_engine_command

        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            tiny_engine_command(self.port, self.max_sessions, "--log-level", "WARNING"),
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        from processors.chroma.remote import EngineUnreachable, RemoteEngine

        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the engine exited ({self.proc.returncode}); see {self.log_path}")
            try:
                RemoteEngine(self.url, connect_timeout=2.0).close()
                return self.url
            except EngineUnreachable:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the engine did not answer in 180 s; see {self.log_path}") from None

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(15)
        self._log.close()


# -- part 1: overhead ----------------------------------------------------------------------------------


def _voice() -> tuple[np.ndarray, str]:
    t = np.arange(24000 * 2) / 24000
    return (0.2 * np.sin(2 * np.pi * 180 * t)).astype(
        np.float32
    ), "Hello, this is the voice of the benchmark."


def _turn(seconds: float, seed: int) -> np.ndarray:
    return (np.random.RandomState(seed).randn(int(16000 * seconds)) * 0.1).astype(np.float32)


async def _answer(sessions: list, turn: np.ndarray) -> list[dict]:
    """Every session answers `turn` at once; per session its time to first audio and, for chunks from a
    remote engine, the seconds between the engine having each chunk and this process yielding it."""

    async def one(session) -> dict:
        started = time.monotonic()
        first, added, chunks = None, [], 0
        async for chunk in session.respond(turn):
            now = time.monotonic()
            first = now - started if first is None else first
            chunks += 1
            made = getattr(chunk, "made", 0.0)
            if made:
                added.append(now - made)
        return {"ttfa": first, "added": added, "chunks": chunks}

    return await asyncio.gather(*(one(s) for s in sessions))


def _measure(new_session, count: int, frames: int, repeats: int) -> dict:
    async def run() -> dict:
        sessions = [new_session(max_frames=frames) for _ in range(count)]
        try:
            await _answer(sessions[:1], _turn(0.5, 1))  # warm-up: the voice prefix, the first allocations
            ttfa, added, chunks = [], [], 0
            cpu = time.process_time()
            for r in range(repeats):
                for row in await _answer(sessions, _turn(0.8, 10 + r)):
                    ttfa.append(row["ttfa"])
                    added += row["added"]
                    chunks += row["chunks"]
            cpu = time.process_time() - cpu  # this process's, every thread: the call server's side only
            return {"ttfa": ttfa, "added": added, "chunks": chunks, "cpu": cpu}
        finally:
            for s in sessions:
                if hasattr(s, "close"):
                    s.close()

    return asyncio.run(run())


def run_overhead(args, folder: Path) -> dict:
    from processors.chroma.checkpoint import load_model
    from processors.chroma.remote import RemoteEngine

    model = load_model("tiny", device="cpu")
    voice = _voice()
    rows = {}
    with EngineProcess(max(args.sessions) + 4, folder / "engine.log") as url:
        engine = RemoteEngine(url)
        for count in args.sessions:
            log(f"overhead: {count} session(s) in process")
            local = _measure(
                lambda **kw: model.new_session(voice, SYSTEM_PROMPT, **kw), count, args.frames, args.repeats
            )
            log(f"overhead: {count} session(s) through the engine service")
            remote = _measure(
                lambda **kw: engine.new_session(voice, SYSTEM_PROMPT, **kw), count, args.frames, args.repeats
            )
            rows[count] = {
                "ttfa_local_p50": statistics.median(local["ttfa"]),
                "ttfa_remote_p50": statistics.median(remote["ttfa"]),
                "ttfa_local_p90": pct(local["ttfa"], 90),
                "ttfa_remote_p90": pct(remote["ttfa"], 90),
                "added_p50": statistics.median(remote["added"]),
                "added_p95": pct(remote["added"], 95),
                "added_max": max(remote["added"]),
                "chunks": remote["chunks"],
                "client_cpu_per_chunk": remote["cpu"] / remote["chunks"],
            }
        engine.close()
    return {"frames": args.frames, "repeats": args.repeats, "rows": rows}


def overhead_table(res: dict) -> str:
    lines = [
        f"### Through the engine service vs in process (tiny model, CPU, loopback; {res['frames']} frames "
        f"per reply, {res['repeats']} turn(s) per session)",
        "",
        "| sessions | TTFA in process p50 / p90 (ms) | TTFA via service p50 / p90 (ms) "
        "| added per chunk p50 / p95 / max (ms) | call-server CPU per chunk (us) | chunks | target |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for count, r in sorted(res["rows"].items(), key=lambda kv: int(kv[0])):
        target = ""
        if int(count) == TARGET_SESSIONS:
            met = r["added_p50"] * 1000 <= CHUNK_TARGET_MS
            target = f"{'met' if met else 'missed'} (<= {CHUNK_TARGET_MS:g} ms p50)"
        lines.append(
            f"| {count} | {ms(r['ttfa_local_p50'])} / {ms(r['ttfa_local_p90'])} "
            f"| {ms(r['ttfa_remote_p50'])} / {ms(r['ttfa_remote_p90'])} "
            f"| {ms(r['added_p50'])} / {ms(r['added_p95'])} / {ms(r['added_max'])} "
            f"| {r['client_cpu_per_chunk'] * 1e6:.0f} | {r['chunks']} | {target} |"
        )
    return "\n".join(lines)


# -- part 2: call servers on one engine -------------------------------------------------------------


def cmd_callserver(args) -> int:
    """bench.pipeline's Twilio call server with its stand-in engine served by the engine service."""
    import uvicorn

    from bench.pipeline import load
    from processors.chroma.remote import RemoteEngine

    # bench.pipeline builds its runtime on `StandInModel(reply_secs=...)`; here that is the shared service.
    load.StandInModel = lambda reply_secs: RemoteEngine(args.engine)
    app = load.build_server_app(args)
    print(json.dumps({"pid": __import__("os").getpid(), "port": args.port}), flush=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", ws_ping_interval=None)
    return 0


def _load_tool(path: str | None) -> Path | None:
    from bench.pipeline.common import BASELINE_TOOL

    candidates = (
        [Path(path)]
        if path
        else [BASELINE_TOOL, ROOT.parent.parent / "shared" / "tools" / BASELINE_TOOL.name]
    )
    return next((c for c in candidates if c.is_file()), None)


def _run_load(tool: Path, server, calls: int, seconds: float, caller_wav: Path, folder: Path) -> dict:
    from bench.pipeline.load import load_command

    report = folder / f"load-{server.port}-{calls}.json"
    command = load_command(tool, server.url, calls, seconds, caller_wav, report)
    limit = seconds + calls / 20.0 + 90
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"error": f"load generator did not finish within {limit:.0f} s"}
    if not report.exists():
        return {"error": f"no report (exit {done.returncode}): {(done.stderr or done.stdout)[-1000:]}"}
    return json.loads(report.read_text())["summary"]


def run_servers(args, folder: Path) -> dict:
    from bench.pipeline.common import REPLY_SECS, StandInModel
    from bench.pipeline.load import LOAD_SENTENCE, Server, Speech, carried, free_port, ours_command
    from processors.chroma.engine_server import EngineThread

    tool = _load_tool(args.load_tool)
    if tool is None:
        return {"skipped": "pipecat_baseline.py not found (give --load-tool PATH)"}
    caller_wav = Speech(folder).wav(LOAD_SENTENCE)
    results = {"seconds": args.seconds, "runs": []}
    with EngineThread(StandInModel(reply_secs=REPLY_SECS), max_sessions=max(args.calls) + 8) as url:
        # First bench.pipeline's own server, its stand-in in process: what the service is weighed against.
        for engine, processes in (("in process", 1), ("service", 1), ("service", 2)):
            servers = []
            for i in range(processes):
                port = free_port()
                command = [
                    sys.executable,
                    "-m",
                    "bench.engine_service",
                    "callserver",
                    "--port",
                    str(port),
                    "--engine",
                    url,
                ]
                if engine == "in process":
                    command = ours_command(port)
                servers.append(
                    Server(
                        f"call server {i + 1}",
                        "ours",
                        "webrtc",
                        command,
                        port,
                        folder / f"callserver-{engine}-{processes}-{i}.log",
                    )
                )
            try:
                for server in servers:
                    server.start()
                for server in servers:
                    server.wait_ready(timeout=120)
                for calls in args.calls:
                    log(f"call servers: {calls} calls over {processes} process(es), engine {engine}")
                    share = [
                        calls // processes + (1 if i < calls % processes else 0) for i in range(processes)
                    ]
                    summaries: list[dict] = [{} for _ in servers]

                    def drive(i: int, share=share, summaries=summaries, servers=servers) -> None:
                        summaries[i] = _run_load(tool, servers[i], share[i], args.seconds, caller_wav, folder)

                    threads = [threading.Thread(target=drive, args=(i,)) for i in range(processes)]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    for server in servers:
                        server.wait_idle(timeout=30)
                    results["runs"].append(
                        {
                            "engine": engine,
                            "processes": processes,
                            "calls": calls,
                            "servers": summaries,
                            "carried": all(not s.get("error") and carried(s) for s in summaries),
                        }
                    )
            finally:
                for server in servers:
                    server.stop()
    return results


def servers_table(res: dict) -> str:
    if "skipped" in res:
        return f"### Call servers on one engine\n\nskipped: {res['skipped']}"
    lines = [
        f"### Call servers sharing one engine service (stand-in engine, bench.pipeline Twilio calls, "
        f"{res['seconds']:g} s each)",
        "",
        "| engine | call-server processes | calls | replies complete | gaps heard (underruns) "
        "| server CPU % of one core (each) | main-thread % (each) | loop lag p99 ms (each) | carried |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in res["runs"]:
        s = run["servers"]
        if any(x.get("error") for x in s):
            lines.append(
                f"| {run['engine']} | {run['processes']} | {run['calls']} | error: "
                f"{'; '.join(x['error'][:80] for x in s if x.get('error'))} | | | | | no |"
            )
            continue
        done = sum(x["replies_completed"] for x in s)
        expected = sum(x["replies_expected"] for x in s)
        gaps = sum(x["playout_underruns"] for x in s)
        cpu = " / ".join(str(x["server_cpu_pct_of_one_core"]) for x in s)
        main = " / ".join(str(x["server_main_thread_pct_of_one_core"]) for x in s)
        lag = " / ".join(str(x["server_loop_lag_ms"]["loop_lag_p99_ms"]) for x in s)
        lines.append(
            f"| {run['engine']} | {run['processes']} | {run['calls']} | {done}/{expected} | {gaps} "
            f"| {cpu} | {main} | {lag} | {'yes' if run['carried'] else 'no'} |"
        )
    most = {
        (e, p): max(
            [r["calls"] for r in res["runs"] if (r["engine"], r["processes"]) == (e, p) and r["carried"]],
            default=0,
        )
        for e, p in {(r["engine"], r["processes"]) for r in res["runs"]}
    }
    lines += [
        "",
        "Most calls carried: "
        + ", ".join(
            f"{p} process{'es' if p > 1 else ''}, engine {e}: {n}" for (e, p), n in sorted(most.items())
        ),
    ]
    return "\n".join(lines)


# -- entry point ------------------------------------------------------------------------------------------


def parse_args(argv=None):
    def counts(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated whole numbers") from None
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: expected numbers of at least 1")
        return values

    p = argparse.ArgumentParser(prog="python -m bench.engine_service", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command")
    server = sub.add_parser("callserver", help="(internal) a Twilio call server on an engine service")
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--engine", required=True)
    server.add_argument("--vad", default="webrtc")
    server.add_argument("--silence-secs", type=float, default=0.5)
    server.add_argument("--reply-secs", type=float, default=2.0)
    server.add_argument("--log-level", default="WARNING")
    server.add_argument("--no-gc-freeze", action="store_true")
    p.add_argument(
        "--quick", action="store_true", help="smoke settings (sessions 1,2; 10 frames; short load)"
    )
    p.add_argument("--only", choices=("overhead", "servers"), default=None)
    p.add_argument("--sessions", type=counts, default=[1, 16], help="concurrent sessions (default: 1,16)")
    p.add_argument("--frames", type=int, default=40, help="frames per reply, 80 ms each (default: 40)")
    p.add_argument("--repeats", type=int, default=3, help="turns per session (default: 3)")
    p.add_argument("--calls", type=counts, default=[20, 40, 60], help="calls for part 2 (default: 20,40,60)")
    p.add_argument("--seconds", type=float, default=30.0, help="seconds of load per run (default: 30)")
    p.add_argument("--load-tool", default=None, metavar="PATH", help="pipecat_baseline.py (default: found)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the raw numbers here")
    args = p.parse_args(argv)
    if args.quick:
        args.sessions, args.frames, args.repeats = [1, 2], 10, 1
        args.calls, args.seconds = [2], 8.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "callserver":
        return cmd_callserver(args)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-engine-service-") as tmp:
        folder = Path(tmp)
        if args.only in (None, "overhead"):
            results["overhead"] = run_overhead(args, folder)
            print(overhead_table(results["overhead"]), flush=True)
            print()
        if args.only in (None, "servers"):
            results["servers"] = run_servers(args, folder)
            print(servers_table(results["servers"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
