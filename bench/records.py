"""Call records benchmark: N concurrent Twilio phone calls with records and recordings off, then on
(SQLite, then PostgreSQL), against the same server; CPU per call-second and output gaps.

    .venv/bin/python -m bench.records                          # 50 calls, 20 s per run, SQLite and PostgreSQL
    .venv/bin/python -m bench.records --calls 10 --seconds 12 --stores sqlite --json out.json
    CHROMA_BENCH_POSTGRES=postgresql://user:pw@host:5432/postgres .venv/bin/python -m bench.records

The server and the callers are the phone benchmark's (bench/phone): `chroma-agent serve`'s app in a
subprocess with the engine replaced by a stand-in (each reply the same tone), and Twilio stand-in
callers that ask, listen, and cut in, so what differs between the rows is the records' own cost: the
recorder's events, the writer thread and its database, and one stereo WAV per call.
PostgreSQL runs get a database of their own, created for the run and dropped after it.

Target: records and recordings on cost at most 10 % more CPU per call-second than off, and add no
output gap over 40 ms. Nothing fails on a miss; the table says met or missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import sys
import tempfile
import time
import urllib.request
import uuid
import wave
from pathlib import Path
from urllib.parse import urlsplit

from .phone.common import GAP_LIMIT_SECS, PhoneServer
from .phone.server import add_server_args, phone_agent
from .phone.twilio import CALL_SECS, run_twilio
from .pipeline.common import REPLY_SECS, Speech, StandInModel, log, ms

POSTGRES = os.environ.get("CHROMA_BENCH_POSTGRES", "postgresql://postgres:postgres@127.0.0.1:5432/postgres")
CPU_TARGET = 1.10  # at most 10 % more CPU per call-second with records on


class RecordsServer(PhoneServer):
    """The phone benchmark's server, its agent file with `records:` as given."""

    def __init__(self, folder: Path, *, records: str, reply_secs: float, max_calls: int = 120):
        super().__init__(folder, reply_secs=reply_secs, max_calls=max_calls)
        self.command[2] = "bench.records"  # same arguments, this module's server
        self.command += ["--records", records]

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(chroma_records_\w+) (\S+)$", text, re.M)}


def cmd_server(args) -> int:
    """The phone benchmark's server, with the agent file's `records:` section from --records."""
    import gc

    import uvicorn
    from loguru import logger

    from agent.runtime import AgentRuntime
    from agent.server import create_app
    from agent.spec import load_agent

    logger.remove()
    logger.add(sys.stderr, level=args.log_level)
    folder = Path(tempfile.mkdtemp(prefix="bench-records-server-"))
    rtp = (args.rtp_first, args.rtp_first + 4 * args.max_calls + 1)
    path = phone_agent(folder, port=args.port, sip_port=args.sip_port, rtp_ports=rtp, max_calls=args.max_calls)
    path.write_text(path.read_text() + f"records: {args.records}\n")
    runtime = AgentRuntime(load_agent(path), model=StandInModel(reply_secs=args.reply_secs))
    app = create_app(runtime)
    gc.collect()
    gc.freeze()
    print(json.dumps({"pid": os.getpid(), "port": args.port}), flush=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", ws_ping_interval=None)
    return 0


def _postgres_database(admin_url: str) -> tuple[str, str]:
    """A fresh database for one run -> (its URL, its name)."""
    import psycopg

    name = f"bench_records_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return urlsplit(admin_url)._replace(path=f"/{name}").geturl(), name


def _drop_postgres_database(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _recorded_seconds(folder: Path) -> tuple[int, float]:
    files, seconds = 0, 0.0
    for path in folder.glob("*.wav"):
        with wave.open(str(path)) as w:
            files += 1
            seconds += w.getnframes() / w.getframerate()
    return files, seconds


async def _one(label: str, records: str, args, speech, folder: Path, recordings: Path | None) -> dict:
    log(f"{label}: {args.calls} Twilio calls for {args.seconds:.0f} s")
    with RecordsServer(folder, records=records, reply_secs=args.reply_secs) as server:
        result = await run_twilio(server, args.calls, args.seconds, speech)
        deadline = time.monotonic() + 30
        metrics = server.metrics()
        while metrics.get("chroma_records_pending", 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            metrics = server.metrics()
    result["label"] = label
    result["records"] = metrics
    if recordings is not None:
        result["recordings"], result["recorded_seconds"] = _recorded_seconds(recordings)
    return result


async def _run(args) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="bench-records-"))
    speech = Speech(folder)
    results = {"machine": platform.platform(), "cpus": len(os.sched_getaffinity(0)), "runs": []}
    # Off first and last: the machine's own drift over the runs shows as the two off rows' difference.
    results["runs"].append(await _one("off", "{enabled: false}", args, speech, folder, None))
    for store in args.stores:
        recordings = folder / f"recordings-{store}"
        name = None
        if store == "sqlite":
            database = str(folder / "calls.db")
        else:
            database, name = _postgres_database(args.postgres)
        try:
            records = json.dumps({"database": database, "recordings": str(recordings)})
            results["runs"].append(await _one(f"on, {store}", records, args, speech, folder, recordings))
        finally:
            if name is not None:
                _drop_postgres_database(args.postgres, name)
    results["runs"].append(await _one("off, again", "{enabled: false}", args, speech, folder, None))
    return results


def table(results: dict) -> str:
    runs = results["runs"]
    offs = [r for r in runs if r["label"].startswith("off")]
    base = sum(r["cpu"] / (r["wall"] * r["calls"]) for r in offs) / len(offs)  # the off runs' mean
    base_over = max(sum(1 for g in r["gaps"] if g > GAP_LIMIT_SECS) for r in offs)
    rows = [
        "| records | calls | replies | CPU-s per call-s | vs off (mean) | gaps > 40 ms | max gap (ms) | records written / lost | recordings (s) | targets |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in runs:
        per = r["cpu"] / (r["wall"] * r["calls"])
        over = sum(1 for g in r["gaps"] if g > GAP_LIMIT_SECS)
        rec = r.get("records") or {}
        written = f"{rec.get('chroma_records_written_total', 0):.0f} / {rec.get('chroma_records_lost_total', 0):.0f}"
        recorded = f"{r['recordings']} files, {r['recorded_seconds']:.0f}" if "recordings" in r else "–"
        is_off = r in offs
        target = "–" if is_off else ("met" if per <= base * CPU_TARGET and over <= base_over else "missed")
        rows.append(
            f"| {r['label']} | {r['calls']} | {r['replies']} | {per:.4f} | {per / base:.2f}x | {over} "
            f"| {ms(max(r['gaps'], default=0))} | {'–' if is_off else written} | {recorded} | {target} |"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["server"]:
        p = argparse.ArgumentParser(prog="python -m bench.records server")
        add_server_args(p)
        p.add_argument("--records", required=True, help="the agent file's records: section, as YAML flow")
        return cmd_server(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(prog="python -m bench.records", description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=50, help="concurrent calls (default 50)")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each run")
    p.add_argument("--stores", default="sqlite,postgres", help="sqlite, postgres or both")
    p.add_argument("--postgres", default=POSTGRES, help="a PostgreSQL URL that may create databases")
    p.add_argument("--reply-secs", type=float, default=REPLY_SECS)
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = p.parse_args(argv)
    args.stores = [s for s in args.stores.split(",") if s]
    if args.seconds + 2.0 < CALL_SECS:
        p.error(f"--seconds {args.seconds:g}: one call takes {CALL_SECS:g} s; give at least {CALL_SECS - 2:g}")
    results = asyncio.run(_run(args))
    print("\n### Call records: Twilio calls, records and recordings off vs on\n\n" + table(results))
    print(f"\nMachine: {results['machine']}, {results['cpus']} CPUs. Target: at most {CPU_TARGET:.2f}x CPU, no added gaps.")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
