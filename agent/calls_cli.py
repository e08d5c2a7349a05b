"""`chroma-agent calls list|show|export|prune`: call records from the command line.

    chroma-agent calls list --db examples/agents/demo/agent.yaml --since 2h
    chroma-agent calls show 20261206-101500-3fa9c1d2 --db calls.db
    chroma-agent calls export --since 7d --format csv --output calls.csv
    chroma-agent calls prune --older-than 30

The database is `--db` (an SQLite file, a postgresql:// URL, or an agent file whose records database is
meant), else $CHROMA_AGENTS_DATABASE_URL. `declare(subparsers, usage_error)` adds the command; what the
user can fix (no database, an unknown call, a bad date) is raised as `usage_error` (one line, exit 2).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from records.model import END_REASONS, CallEvent, CallInfo
from records.store import CallStore, StoreError, open_store

DATABASE_URL_ENV = "CHROMA_AGENTS_DATABASE_URL"
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
CSV_COLUMNS = (
    "call_id", "agent", "transport", "caller", "callee", "started", "ended", "end_reason",
    "seq", "at", "offset_s", "kind", "data",
)  # fmt: skip


def declare(subparsers, usage_error: type[Exception]) -> None:
    p = subparsers.add_parser("calls", help="read call records: list, show, export; delete old ones (prune)")
    database = argparse.ArgumentParser(add_help=False)
    database.add_argument(
        "--db", default=None, metavar="PATH|URL|AGENT.yaml",
        help=f"an SQLite file, a postgresql:// URL, or an agent file (its records database); "
        f"default: ${DATABASE_URL_ENV}",
    )  # fmt: skip
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--since", default=None, metavar="WHEN",
                         help="calls started since: a date (2026-12-01), a date and time (2026-12-01T09:30) or an age (2h, 7d)")
    filters.add_argument("--agent", default=None, metavar="NAME", help="calls of this agent")
    filters.add_argument("--transport", default=None, metavar="KIND", help="calls over webrtc, twilio, sip or file")
    filters.add_argument("--ended-by", default=None, metavar="REASON", help=f"calls that ended so: {', '.join(END_REASONS)}")
    actions = p.add_subparsers(dest="calls_command", metavar="ACTION", required=True)

    listing = actions.add_parser("list", parents=[database, filters], help="recent calls, newest first")
    listing.add_argument("--limit", type=int, default=100, metavar="N", help="at most N calls (default: 100)")

    show = actions.add_parser("show", parents=[database], help="one call: its transcript with timings, tool calls and events")
    show.add_argument("call_id", metavar="ID", help="the call's record id (from `calls list`)")

    export = actions.add_parser(
        "export", parents=[database, filters], help="calls with their events as JSON lines or CSV",
        description="Export one call (ID) or every call matching the filters (--since required), oldest first: "
        "jsonl writes one call per line with its events; csv writes one row per event.",
    )  # fmt: skip
    export.add_argument("call_id", nargs="?", default=None, metavar="ID", help="one call's record id")
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="(default: jsonl)")
    export.add_argument("--output", default=None, metavar="FILE", help="where to write (default: standard output)")

    prune = actions.add_parser("prune", parents=[database], help="delete calls older than N days, with their recordings")
    prune.add_argument("--older-than", required=True, type=float, metavar="DAYS", help="age in days (may be fractional)")

    def run(action):
        def wrapped(args: argparse.Namespace) -> int:
            url = database_for(args.db, usage_error)
            store = _open(url, usage_error)
            try:
                return action(store, url, args, usage_error)
            finally:
                store.close()

        return wrapped

    listing.set_defaults(run=run(_list))
    show.set_defaults(run=run(_show))
    export.set_defaults(run=run(_export))
    prune.set_defaults(run=run(_prune))


# -- which database ----------------------------------------------------------------------------------


def database_for(db: str | None, usage_error: type[Exception]) -> str:
    """--db, else the environment's URL; an agent file stands for its records database."""
    if db is None:
        db = os.environ.get(DATABASE_URL_ENV, "").strip() or None
        if db is None:
            raise usage_error(f"no call records database: expected --db PATH|URL|AGENT.yaml, or ${DATABASE_URL_ENV} set")
    if Path(db).suffix.lower() in (".yaml", ".yml"):
        return _agent_database(Path(db), usage_error)
    return db


def _agent_database(path: Path, usage_error: type[Exception]) -> str:
    import yaml
    from pydantic import ValidationError

    from agent.spec import RecordsSpec

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise usage_error(f"--db {path}: no such agent file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise usage_error(f"--db {path}: cannot be read as an agent file ({exc})") from None
    section = (data or {}).get("records", {}) if isinstance(data, dict) else None
    if not isinstance(section, dict):
        raise usage_error(f"{path}: records: expected a mapping (database, recordings, retention_days)")
    try:
        records = RecordsSpec.model_validate(section)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(x) for x in ("records", *first["loc"]))
        raise usage_error(f"{path}: {field}: {first['msg']}") from None
    return records.database_url(path.resolve().parent)


def _open(url: str, usage_error: type[Exception]) -> CallStore:
    try:
        return open_store(url, create=False)  # reading never makes an empty database
    except StoreError as exc:
        raise usage_error(str(exc)) from None


# -- dates -------------------------------------------------------------------------------------------


def parse_when(text: str, *, now: float | None = None) -> float:
    """Epoch seconds for an age (90s, 30m, 2h, 7d, 2w) or an ISO date or date and time (local time unless
    it names its offset)."""
    age = AGE.match(text)
    if age:
        return (time.time() if now is None else now) - float(age.group(1)) * AGE_UNITS[age.group(2)]
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r}, expected a date (2026-12-01), a date and time (2026-12-01T09:30) or an age (30m, 2h, 7d)"
        ) from None
    return when.timestamp()  # naive: local time


def _since(args: argparse.Namespace, usage_error: type[Exception]) -> float | None:
    if args.since is None:
        return None
    try:
        return parse_when(args.since)
    except ValueError as exc:
        raise usage_error(f"--since is {exc}") from None


def _filters(args: argparse.Namespace, usage_error: type[Exception]) -> dict[str, Any]:
    return {
        "since": _since(args, usage_error),
        "agent": args.agent,
        "transport": args.transport,
        "ended_by": args.ended_by,
    }


def _local(epoch: float | None, *, ms: bool = False) -> str:
    if epoch is None:
        return "-"
    stamp = dt.datetime.fromtimestamp(epoch)
    return stamp.isoformat(sep=" ", timespec="milliseconds" if ms else "seconds")


def _utc(epoch: float | None) -> str:
    return "" if epoch is None else dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="milliseconds")


def _duration(info: CallInfo) -> str:
    if info.ended_at is None:
        return "-"
    seconds = max(0, round(info.ended_at - info.started_at))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


# -- list --------------------------------------------------------------------------------------------


def _list(store: CallStore, url: str, args: argparse.Namespace, usage_error) -> int:
    if args.limit < 1:
        raise usage_error(f"--limit is {args.limit}, expected a positive number of calls")
    calls = store.list_calls(**_filters(args, usage_error), limit=args.limit)
    if not calls:
        print("no calls match", file=sys.stderr)
        return 0
    rows = [
        (
            _local(c.started_at), _duration(c), c.agent, c.transport,
            f"{c.caller or '?'} -> {c.callee or '?'}", c.end_reason or "(not ended)", c.call_id,
        )  # fmt: skip
        for c in calls
    ]
    header = ("STARTED", "LENGTH", "AGENT", "TRANSPORT", "FROM -> TO", "ENDED BY", "ID")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


# -- show --------------------------------------------------------------------------------------------


def _show(store: CallStore, url: str, args: argparse.Namespace, usage_error) -> int:
    found = store.get_call(args.call_id)
    if found is None:
        raise usage_error(f"no call {args.call_id!r} in {_where(url)}; `chroma-agent calls list` shows its calls")
    info, events = found
    print("\n".join(describe_call(info, events)))
    return 0


def describe_call(info: CallInfo, events: list[CallEvent]) -> list[str]:
    """A call for reading: its facts, then every event at its time from the start of the call."""
    ids = ", ".join(f"{k}={v}" for k, v in info.transport_ids.items())
    lines = [
        f"call {info.call_id}",
        f"  agent      {info.agent}" + (f" (voice {info.voice})" if info.voice else ""),
        f"  transport  {info.transport}" + (f"  {ids}" if ids else ""),
        f"  from       {info.caller or '?'}  to {info.callee or '?'}  ({info.direction})",
        f"  started    {_local(info.started_at, ms=True)}",
        f"  answered   {_offset(info.answered_at, info.started_at)}",
        f"  ended      {_offset(info.ended_at, info.started_at)}"
        + (f"  {info.end_reason}" if info.end_reason else "")
        + (f": {info.end_detail}" if info.end_detail else ""),
    ]
    if info.server:
        lines.append(f"  server     {info.server}")
    if info.recording:
        lines.append(f"  recording  {info.recording}")
    lines.append(f"events ({len(events)}; seconds from the start)" if events else "no events")
    for e in events:
        who, what = describe_event(e)
        lines.append(f"  {_offset(e.at, info.started_at, unit=''):>9}  {who:<8} {what}")
    return lines


def _offset(at: float | None, start: float, unit: str = " s") -> str:
    return "-" if at is None else f"+{at - start:.2f}{unit}"


def describe_event(e: CallEvent) -> tuple[str, str]:
    """(who, what) for one event; kinds not known here show their data as JSON."""
    d = e.data
    if e.kind == "caller_turn_started":
        return "caller", "starts speaking"
    if e.kind == "caller_turn_ended":
        audio = d.get("audio_seconds")
        return "caller", "stops speaking" + (f" ({audio:.2f} s)" if isinstance(audio, int | float) else "")
    if e.kind == "reply_started":
        return "agent", f"reply {d.get('turn', '?')} starts"
    if e.kind == "first_audio":
        return "agent", f"first audio after {d.get('seconds', '?')} s"
    if e.kind == "agent_reply":
        said = f"says {json.dumps(d.get('text', ''), ensure_ascii=False)}"
        if d.get("interrupted"):
            heard = json.dumps(d.get("heard_text", ""), ensure_ascii=False)
            said += f"\n{'':22}cut off: caller heard {heard} ({d.get('heard_frames', '?')} of {d.get('frames', '?')} frames)"
        return "agent", said
    if e.kind == "barge_in":
        return "caller", f"barges in ({d.get('heard_frames', '?')} of {d.get('sent_frames', '?')} frames heard)"
    if e.kind == "node":
        return "flow", f"node {d.get('name', '?')}" + (" (sensitive)" if d.get("sensitive") else "")
    if e.kind == "tool_call":
        return "tool", f"{d.get('name', '?')}({_compact(d.get('arguments', {}))})"
    if e.kind == "tool_result":
        took = f" in {d['seconds']} s" if d.get("seconds") is not None else ""
        if d.get("error") is not None:
            return "tool", f"{d.get('name', '?')} failed{took}: {_compact(d['error'])}"
        return "tool", f"{d.get('name', '?')} -> {_compact(d.get('result'))}{took}"
    if e.kind == "keypad":
        return "caller", f"presses {d.get('key', '?')}" + (" (redacted)" if d.get("redacted") else "")
    if e.kind == "turn_failed":
        return "agent", f"reply failed: {d.get('error', '?')}"
    if e.kind == "agent_hung_up":
        return "agent", "hangs up"
    if e.kind == "transferred":
        return "agent", f"transfers the call to {d.get('to', '?')}"
    if e.kind == "transfer_failed":
        return "agent", f"transfer to {d.get('to', '?')} failed: {d.get('reason', '?')}"
    if e.kind == "dtmf_sent":
        return "agent", f"sends keypad tones {d.get('digits', '?')}"
    return e.kind, _compact(d) if d else ""


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def _where(url: str) -> str:
    if url.startswith(("postgresql://", "postgres://")):
        from records.postgres import describe_url

        return describe_url(url)
    return url


# -- export ------------------------------------------------------------------------------------------


def _export(store: CallStore, url: str, args: argparse.Namespace, usage_error) -> int:
    filters = _filters(args, usage_error)
    if args.call_id is not None:
        if any(v is not None for v in filters.values()):
            raise usage_error("give a call ID or filters (--since, --agent, --transport, --ended-by), not both")
        found = store.get_call(args.call_id)
        if found is None:
            raise usage_error(f"no call {args.call_id!r} in {_where(url)}; `chroma-agent calls list` shows its calls")
        calls: Iterable[tuple[CallInfo, list[CallEvent]]] = [found]
    elif filters["since"] is None:
        raise usage_error("expected a call ID or --since WHEN (an export of every call must say from when)")
    else:
        calls = store.iter_calls(**filters)
    out = _output(args.output, usage_error)
    try:
        count = write_jsonl(calls, out) if args.format == "jsonl" else write_csv(calls, out)
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"exported {count} call{'s' if count != 1 else ''}" + (f" to {args.output}" if args.output else ""), file=sys.stderr)
    return 0


def _output(path: str | None, usage_error) -> TextIO:
    if path is None:
        return sys.stdout
    try:
        return open(path, "w", encoding="utf-8", newline="")
    except OSError as exc:
        raise usage_error(f"--output {path}: cannot be written ({exc.strerror})") from None


def write_jsonl(calls: Iterable[tuple[CallInfo, list[CallEvent]]], out: TextIO) -> int:
    """One line per call: {"call": its fields, "events": [{seq, at, kind, data}, ...]}; times in epoch seconds."""
    count = 0
    for info, events in calls:
        line = {
            "call": dataclasses.asdict(info),
            "events": [{"seq": e.seq, "at": e.at, "kind": e.kind, "data": e.data} for e in events],
        }
        out.write(json.dumps(line, ensure_ascii=False) + "\n")
        count += 1
    return count


def write_csv(calls: Iterable[tuple[CallInfo, list[CallEvent]]], out: TextIO) -> int:
    """One row per event with its call's fields (a call without events gets one row); times in UTC ISO."""
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    count = 0
    for info, events in calls:
        call = [info.call_id, info.agent, info.transport, info.caller or "", info.callee or "",
                _utc(info.started_at), _utc(info.ended_at), info.end_reason or ""]  # fmt: skip
        for row in _event_rows(info, events):
            writer.writerow(call + row)
        count += 1
    return count


def _event_rows(info: CallInfo, events: list[CallEvent]) -> Iterator[list[Any]]:
    if not events:
        yield ["", "", "", "", ""]
    for e in events:
        yield [e.seq, _utc(e.at), f"{e.at - info.started_at:.3f}", e.kind, json.dumps(e.data, ensure_ascii=False)]


# -- prune -------------------------------------------------------------------------------------------


def _prune(store: CallStore, url: str, args: argparse.Namespace, usage_error) -> int:
    from records.retention import prune

    if not args.older_than > 0:
        raise usage_error(f"--older-than is {args.older_than:g}, expected a number of days above 0")
    result = prune(store, args.older_than)
    print(
        f"deleted {len(result.calls)} call{'s' if len(result.calls) != 1 else ''} started more than "
        f"{args.older_than:g} days ago, and {result.recordings_removed} recording"
        f"{'s' if result.recordings_removed != 1 else ''}"
    )
    for failure in result.recordings_failed:
        print(f"could not remove recording {failure}", file=sys.stderr)
    return 1 if result.recordings_failed else 0
