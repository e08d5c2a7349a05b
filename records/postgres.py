"""Call records on PostgreSQL, for many servers sharing one database (psycopg 3).

The connection is made again after it breaks (a restarted or unreachable server), so the writer's
retries resume writing once the database is back. Statements time out rather than hang the writer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from records.sql_store import SqlStore
from records.store import RecordRejected, StoreError

CONNECT_TIMEOUT_S = 5
STATEMENT_TIMEOUT_MS = 30_000
_MIGRATION_LOCK = "chroma_agents_call_records"


def describe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        p = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparseable URL)"
    user = f"{p['user']}@" if p.get("user") else ""
    port = f":{p['port']}" if p.get("port") else ""
    return f"postgresql://{user}{p.get('host', '')}{port}/{p.get('dbname', '')}"


class _Query:
    def __init__(self, conn: psycopg.Connection):
        self._conn = conn

    def __call__(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        cur = self._conn.execute(sql.replace("?", "%s"), params)
        return cur.fetchall() if cur.description is not None else []

    def many(self, sql: str, rows: list[Sequence[Any]]) -> None:
        with self._conn.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), rows)


class PostgresStore(SqlStore):
    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self.where = describe_url(url)
        self._conn: psycopg.Connection | None = None
        try:
            self._migrate(self.where)
        except (psycopg.Error, RecordRejected) as exc:
            self.close()
            raise StoreError(f"{self.where}: cannot use the call records database ({_first_line(exc)})") from exc

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            self._conn = psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT_S,
                options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
            )
        return self._conn

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[_Query]:
        conn = self._connection()
        try:
            with conn.transaction():
                yield _Query(conn)
        except (psycopg.IntegrityError, psycopg.DataError, psycopg.ProgrammingError) as exc:
            # The op's content was refused (a constraint, a value PostgreSQL cannot hold): retrying cannot help.
            raise RecordRejected(_first_line(exc)) from exc

    def _has_table(self, q, name: str) -> bool:
        return q("SELECT to_regclass(?) IS NOT NULL", (name,))[0][0]

    def _lock_for_migration(self, q) -> None:
        q("SELECT pg_advisory_xact_lock(hashtext(?))", (_MIGRATION_LOCK,))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
