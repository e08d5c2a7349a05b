"""The CallStore on SQL, written once for SQLite and PostgreSQL.

A subclass supplies the connection: `_transaction()` yields a `Query` that runs one statement (with `?`
placeholders) inside a transaction, and maps the driver's errors onto `RecordRejected` (the op's
content was refused) or lets them through (the database is failing; the writer retries).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from records.model import CallEvent, CallInfo
from records.schema import CREATE_VERSION_TABLE, LATEST_VERSION, pending_migrations
from records.store import RecordRejected, StoreError

CALL_COLUMNS = tuple(f.name for f in dataclasses.fields(CallInfo))
_UPDATABLE = frozenset(CALL_COLUMNS) - {"call_id"}
_SELECT_CALLS = f"SELECT {', '.join(CALL_COLUMNS)} FROM calls"


class Query(Protocol):
    def __call__(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]: ...

    def many(self, sql: str, rows: list[Sequence[Any]]) -> None: ...


def to_json(value: Any) -> str:
    # Event data comes from many places; a numpy number or a Path must not cost the event.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def _json_default(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars
    if callable(tolist):
        return tolist()
    return str(value)


class SqlStore(ABC):
    """Calls and events on a SQL database; every method is one transaction, serialized by a lock so that
    the writer's thread and readers (the web view, the CLI) can share one store."""

    def __init__(self) -> None:
        self._lock = threading.RLock()

    # -- supplied by the database ---------------------------------------------

    @abstractmethod
    def _transaction(self, write: bool = True) -> AbstractContextManager[Query]:
        """A transaction; `write=False` for reads, which then take no write lock (SQLite)."""

    @abstractmethod
    def _has_table(self, q: Query, name: str) -> bool: ...

    def _lock_for_migration(self, q: Query) -> None:
        """Keep two processes from migrating the same database at once (SQLite: its write transaction
        already does)."""
        return None

    # -- schema -----------------------------------------------------------------

    def _migrate(self, where: str) -> None:
        # Read first: an up-to-date database is opened without writing (a read-only file stays readable).
        with self._lock, self._transaction(write=False) as q:
            current = self._version(q)
        if current == LATEST_VERSION:
            return
        with self._lock, self._transaction() as q:
            self._lock_for_migration(q)
            q(CREATE_VERSION_TABLE)
            current = self._version(q)  # another process may have migrated meanwhile
            if current > LATEST_VERSION:
                raise StoreError(
                    f"{where}: call records schema version {current} is newer than this chroma-agents knows "
                    f"({LATEST_VERSION}); upgrade chroma-agents to use this database"
                )
            for version, description, statements in pending_migrations(current):
                for sql in statements:
                    q(sql)
                q(
                    "INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
                    (version, description, time.time()),
                )

    def _version(self, q: Query) -> int:
        if not self._has_table(q, "schema_version"):
            return 0
        return q("SELECT COALESCE(MAX(version), 0) FROM schema_version")[0][0]

    def schema_version(self) -> int:
        with self._lock, self._transaction(write=False) as q:
            return self._version(q)

    # -- writes -----------------------------------------------------------------

    def start_call(self, info: CallInfo) -> None:
        row = _call_row(info)
        assignments = ", ".join(f"{c} = excluded.{c}" for c in CALL_COLUMNS[1:])
        # An upsert: the writer may retry a start whose commit it did not see.
        sql = (
            f"INSERT INTO calls ({', '.join(CALL_COLUMNS)}) VALUES ({', '.join('?' * len(CALL_COLUMNS))}) "
            f"ON CONFLICT (call_id) DO UPDATE SET {assignments}"
        )
        with self._lock, self._transaction() as q:
            q(sql, row)

    def add_events(self, events: list[CallEvent]) -> None:
        if not events:
            return
        rows = [(e.call_id, e.seq, e.at, e.kind, to_json(e.data)) for e in events]
        with self._lock, self._transaction() as q:
            # Events of a call never recorded would vanish unseen; say which call.
            wanted = sorted({e.call_id for e in events})
            known = {r[0] for r in q(f"SELECT call_id FROM calls WHERE call_id IN ({', '.join('?' * len(wanted))})", wanted)}
            missing = [c for c in wanted if c not in known]
            if missing:
                raise RecordRejected(f"events for calls never started: {', '.join(missing)}")
            # A retried batch writes each (call, seq) once.
            q.many(
                "INSERT INTO call_events (call_id, seq, at, kind, data) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (call_id, seq) DO NOTHING",
                rows,
            )

    def update_call(self, call_id: str, /, **fields: Any) -> None:
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise RecordRejected(f"update_call {call_id}: {sorted(unknown)} are not fields a call record can change")
        if not fields:
            return
        names = sorted(fields)
        values = [json.dumps(dict(fields[n] or {})) if n == "transport_ids" else fields[n] for n in names]
        with self._lock, self._transaction() as q:
            self._update(q, call_id, names, values)

    def end_call(self, call_id: str, ended_at: float, end_reason: str, end_detail: str | None = None) -> None:
        with self._lock, self._transaction() as q:
            self._update(q, call_id, ["ended_at", "end_reason", "end_detail"], [ended_at, end_reason, end_detail])

    def _update(self, q: Query, call_id: str, names: list[str], values: list[Any]) -> None:
        sets = ", ".join(f"{n} = ?" for n in names)
        if not q(f"UPDATE calls SET {sets} WHERE call_id = ? RETURNING call_id", [*values, call_id]):
            raise RecordRejected(f"no call {call_id!r} to update")

    def mark_unfinished(
        self, end_reason: str = "crash", *, server: str | None = None, started_before: float | None = None
    ) -> list[str]:
        where, params = ["ended_at IS NULL"], [end_reason]
        if server is not None:
            where.append("server = ?")
            params.append(server)
        if started_before is not None:
            where.append("started_at < ?")
            params.append(started_before)
        with self._lock, self._transaction() as q:
            rows = q(
                "UPDATE calls SET end_reason = ?, ended_at = COALESCE("
                "(SELECT MAX(e.at) FROM call_events e WHERE e.call_id = calls.call_id), answered_at, started_at) "
                f"WHERE {' AND '.join(where)} RETURNING call_id",
                params,
            )
        return sorted(r[0] for r in rows)

    def delete_before(self, cutoff: float) -> list[CallInfo]:
        with self._lock, self._transaction() as q:
            rows = q(
                f"DELETE FROM calls WHERE started_at < ? RETURNING {', '.join(CALL_COLUMNS)}",
                (cutoff,),
            )
        return sorted((_call_info(r) for r in rows), key=lambda c: c.started_at)

    # -- reads ------------------------------------------------------------------

    def list_calls(
        self,
        *,
        since: float | None = None,
        agent: str | None = None,
        transport: str | None = None,
        ended_by: str | None = None,
        limit: int = 100,
    ) -> list[CallInfo]:
        where, params = _filters(since, agent, transport, ended_by)
        sql = _SELECT_CALLS + (f" WHERE {' AND '.join(where)}" if where else "")
        sql += " ORDER BY started_at DESC, call_id LIMIT ?"
        with self._lock, self._transaction(write=False) as q:
            rows = q(sql, [*params, max(0, int(limit))])
        return [_call_info(r) for r in rows]

    def get_call(self, call_id: str) -> tuple[CallInfo, list[CallEvent]] | None:
        with self._lock, self._transaction(write=False) as q:
            rows = q(_SELECT_CALLS + " WHERE call_id = ?", (call_id,))
            if not rows:
                return None
            events = q("SELECT call_id, seq, at, kind, data FROM call_events WHERE call_id = ? ORDER BY seq", (call_id,))
        return _call_info(rows[0]), [CallEvent(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in events]

    def iter_calls(
        self,
        *,
        since: float | None = None,
        agent: str | None = None,
        transport: str | None = None,
        ended_by: str | None = None,
        batch: int = 500,
    ) -> Iterator[tuple[CallInfo, list[CallEvent]]]:
        """Every matching call with its events, oldest first, read a batch of calls at a time (exports)."""
        where, params = _filters(None, agent, transport, ended_by)
        # Keyset paging from (since, ""): a call started exactly at `since` sorts after the empty id, so it is in.
        after: tuple[float, str] = (since if since is not None else float("-inf"), "")
        while True:
            page = "(started_at > ? OR (started_at = ? AND call_id > ?))"
            sql = _SELECT_CALLS + f" WHERE {' AND '.join([page, *where])} ORDER BY started_at, call_id LIMIT ?"
            with self._lock, self._transaction(write=False) as q:
                rows = q(sql, [after[0], after[0], after[1], *params, batch])
            if not rows:
                return
            for row in rows:
                found = self.get_call(row[0])
                if found is not None:
                    yield found
            after = (rows[-1][CALL_COLUMNS.index("started_at")], rows[-1][0])

def _filters(
    since: float | None, agent: str | None, transport: str | None, ended_by: str | None
) -> tuple[list[str], list[Any]]:
    where, params = [], []
    for column, op, value in (
        ("started_at", ">=", since),
        ("agent", "=", agent),
        ("transport", "=", transport),
        ("end_reason", "=", ended_by),
    ):
        if value is not None:
            where.append(f"{column} {op} ?")
            params.append(value)
    return where, params


def _call_row(info: CallInfo) -> list[Any]:
    return [json.dumps(dict(info.transport_ids)) if c == "transport_ids" else getattr(info, c) for c in CALL_COLUMNS]


def _call_info(row: Sequence[Any]) -> CallInfo:
    values = dict(zip(CALL_COLUMNS, row, strict=True))
    values["transport_ids"] = json.loads(values["transport_ids"])
    return CallInfo(**values)
