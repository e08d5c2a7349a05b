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
import contextlib
import gc
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import wave
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import WebSocket  # at module level: the /ws handler's annotation is resolved from these globals

ROOT = Path(__file__).resolve().parents[1]
BASELINE_TOOL = ROOT.parent / "shared" / "tools" / "pipecat_baseline.py"
VOICE_AUDIO = ROOT / "examples" / "voices" / "demo" / "reference.wav"
VOICE_TRANSCRIPT = ROOT / "examples" / "voices" / "demo" / "transcript.txt"

PHONE_RATE = 8000
ENGINE_RATE = 24000  # what Chroma speaks (processors.chroma.config.SAMPLE_RATE; not imported: torch)
ENGINE_FRAME_SECS = 0.08
TONE_HZ = 440.0
TONE_AMPLITUDE = 0.3  # as the baseline's ToneBot
REPLY_SECS = 2.0  # the baseline's --tone-secs default, which its load generator expects
CALLER_SPEECH_SECS = 1.5  # the caller profile of pipecat-baseline.md: 1.5 s of speech, 3 s of silence
CALLER_SILENCE_SECS = 3.0
VAD_START_SECS = 0.2
BARGE_IN_MARGIN_SECS = 0.040
LATENCY_TARGET_SECS = 0.5
REQUIRED_CALLS = (1, 10, 50)  # always run for every server; other counts stop once a server has failed

LOAD_SENTENCE = "Hello, I would like to check on the delivery of my order, please."
BARGE_SENTENCES = [
    ("Please tell me everything about my account.", "Wait, stop, I have another question."),
    ("Can you explain my last invoice?", "Sorry, hold on a second."),
    ("What are your opening hours this week?", "No, that is not what I asked."),
    ("I would like to return a pair of shoes.", "Excuse me, one more thing please."),
    ("Where is my parcel right now?", "Hang on, let me find the number."),
]
LATENCY_SENTENCES = [
    "Hello, I would like to check my order.",
    "My order number is four five six seven.",
    "It was supposed to arrive last Tuesday.",
    "Can you send it again to the same address?",
    "Thank you very much, that is all for today.",
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def percentile(values, p):
    """Nearest-rank percentile; None for no values."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return values[max(0, min(len(values) - 1, math.ceil(p / 100 * len(values)) - 1))]


def ms(seconds, digits=0):
    if seconds is None:
        return "–"
    return f"{seconds * 1000:.{digits}f}"


# -- the stand-in engine ---------------------------------------------------------------------------


@dataclass
class StandInChunk:
    audio: np.ndarray  # float32, 24 kHz mono
    frames: tuple[int, int]
    text: str = ""


@dataclass
class StandInConfig:
    is_tiny: bool = False


class StandInSession:
    """The session interface ChromaS2SService uses, answering every turn with a fixed tone at once.

    Chunks are `chunk_frames` engine frames (80 ms each) long, as the real session streams them."""

    def __init__(self, model: StandInModel, system_prompt: str, chunk_frames: int):
        self.model = model
        self.system_prompt = system_prompt
        self.chunk_frames = chunk_frames
        self.turns = 0
        self.heard_frames: int | None = None
        self.instructions: list[str] = []
        self._cancelled = False

    async def respond(self, user_audio_16k: np.ndarray):
        self._cancelled = False
        self.turns += 1
        audio = self.model.reply
        step = int(round(self.chunk_frames * ENGINE_FRAME_SECS * ENGINE_RATE))
        frame = 0
        for i in range(0, audio.size, step):
            if self._cancelled:
                return
            piece = audio[i : i + step]
            frames = max(1, round(piece.size / (ENGINE_FRAME_SECS * ENGINE_RATE)))
            yield StandInChunk(piece, (frame, frame + frames))
            frame += frames

    def cancel(self) -> None:
        self._cancelled = True

    def heard(self, frames: int) -> None:
        self.heard_frames = frames

    def instruct(self, text: str) -> None:
        self.instructions.append(text)

    @property
    def kept_text(self) -> str:
        return ""


class StandInModel:
    """Stands in for the loaded Chroma model in AgentRuntime: no weights, no steps, no threads."""

    def __init__(self, reply_secs: float = REPLY_SECS):
        self.config = StandInConfig()
        self.source = "stand-in"
        self.device = "cpu"
        n = int(round(reply_secs * ENGINE_RATE))
        t = np.arange(n) / ENGINE_RATE
        self.reply = (TONE_AMPLITUDE * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)

    def new_session(self, voice, system_prompt: str = "", *, chunk_frames: int = 2, **_kwargs):
        return StandInSession(self, system_prompt, chunk_frames)


# -- agent files and speech --------------------------------------------------------------------------


def agent_file(
    folder: Path,
    *,
    name: str,
    model: str = "tiny",
    vad: str = "webrtc",
    detector: str = "silence",
    silence_secs: float = 0.8,
    max_seconds: float = 30,
) -> Path:
    """The demo agent (examples/agents/demo/agent.yaml) with the given settings; everything else default."""
    path = folder / f"{name}.yaml"
    path.write_text(
        f"""name: bench {name}
model: {model}
voice:
  audio: {VOICE_AUDIO}
  transcript_file: {VOICE_TRANSCRIPT}
system_prompt: You are the friendly customer-service agent of a small online shop, answering the phone.
vad:
  analyzer: {vad}
  aggressiveness: 2
  frame_ms: 20
  confidence: 0.7
  start_secs: {VAD_START_SECS}
  stop_secs: 0.2
  min_volume: 0.6
turn:
  detector: {detector}
  silence_secs: {silence_secs}
response:
  max_seconds: {max_seconds}
  chunk_frames: 2
  lookahead: 3
  temperature: 0.0
  allow_interruptions: true
"""
    )
    return path


class Speech:
    """espeak-ng sentences as int16 at a given rate, cached in a folder for the run."""

    def __init__(self, folder: Path):
        self.espeak = shutil.which("espeak-ng")
        if self.espeak is None:
            raise SystemExit("espeak-ng is not installed (apt-get install espeak-ng); the benchmark needs it")
        self.folder = folder
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    def wav(self, text: str) -> Path:
        """The sentence as espeak-ng writes it (its own rate)."""
        path = self.folder / f"espeak-{hashlib.sha1(text.encode()).hexdigest()[:12]}.wav"
        if not path.exists():
            subprocess.run([self.espeak, "-w", str(path), text], check=True, capture_output=True)
        return path

    def samples(self, text: str, rate: int) -> np.ndarray:
        key = (text, rate)
        if key not in self._cache:
            import soxr

            with wave.open(str(self.wav(text)), "rb") as w:
                native = w.getframerate()
                x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
            y = soxr.resample(x.astype(np.float32), native, rate, quality="HQ")
            self._cache[key] = np.clip(np.rint(y), -32768, 32767).astype(np.int16)
        return self._cache[key]


def loud_span(samples: np.ndarray, rate: int, floor_db: float = -40.0) -> tuple[float, float]:
    """(start, end) seconds of the speech in `samples`: 10 ms blocks within floor_db of the loudest."""
    block = rate // 100
    n = samples.size // block
    energy = (samples[: n * block].astype(np.float64).reshape(n, block) ** 2).mean(axis=1)
    db = 10 * np.log10(energy + 1e-9)
    loud = np.flatnonzero(db > db.max() + floor_db)
    return loud[0] * block / rate, (loud[-1] + 1) * block / rate


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
        call = runtime.new_call(transport, kind="twilio", out_rate=PHONE_RATE, in_rate=PHONE_RATE)

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


def make_servers(args, folder: Path) -> list[Server]:
    py = sys.executable
    servers = []

    def ours() -> Server:
        port = free_port()
        command = [py, "-m", "bench.pipeline", "server", "--port", str(port), "--vad", "webrtc"]
        return Server("chroma-agents (webrtcvad)", "ours", "webrtc", command, port, folder / "server-ours-webrtc.log")

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
                [py, "-m", "bench.pipeline", "server", "--port", str(port), "--vad", "webrtc", "--no-gc-freeze"],
                port,
                folder / "server-ours-webrtc-no-gc-freeze.log",
            )
        )
    return servers


def run_load(server: Server, calls: int, seconds: float, caller_wav: Path, folder: Path) -> dict:
    report = folder / f"load-{server.framework}-{server.vad}-{calls}.json"
    cmd = [
        sys.executable,
        str(BASELINE_TOOL),
        "load",
        "--url",
        server.url,
        "--calls",
        str(calls),
        "--seconds",
        str(seconds),
        "--caller-wav",
        str(caller_wav),
        "--speech-secs",
        str(CALLER_SPEECH_SECS),
        "--silence-secs",
        str(CALLER_SILENCE_SECS),
        "--tone-secs",
        str(REPLY_SECS),
        "--report",
        str(report),
    ]
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

    transport = FileCallTransport(caller, rate, output_rate=PHONE_RATE)
    call = runtime.new_call(transport, kind="file", out_rate=PHONE_RATE, in_rate=rate)
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
    session = runtime.new_session()
    audio = speech.samples(LATENCY_SENTENCES[0], 16000).astype(np.float32) / 32768.0
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


CONCURRENCY_NOTES = """
- Both servers take Twilio Media Streams on `/ws` through pipecat's `parse_telephony_websocket`,
  `FastAPIWebsocketTransport` and `TwilioFrameSerializer` (8 kHz mu-law), and answer each caller turn
  with 2 s of 440 Hz tone at 24 kHz (pipecat: its ToneBot in 40 ms frames; ours: the stand-in engine
  in 160 ms chunks, as Chroma streams with chunk_frames 2), so both resample to 8 kHz and encode; no
  model cost on either side. Callers: 1.5 s of espeak-ng speech, 3 s of silence, repeated, 20 ms
  frames at real time, measured over {secs:g} s with all calls streaming.
- pipecat: `pipecat_baseline.py server` as documented in pipecat-baseline.md (VADProcessor +
  UserTurnProcessor, VAD at 8 kHz, pipecat's default observers). Ours: agent/runtime.py's call
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
