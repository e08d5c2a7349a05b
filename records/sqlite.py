"""Call records in one SQLite file, the default: nothing to set up.

WAL mode lets the web view and the CLI read while a server writes; `synchronous=NORMAL` in WAL mode
syncs at checkpoints, not at every commit, so a record write costs no fsync on the writer's thread.
A crash of the process (not of the machine) loses nothing committed.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from records.sql_store import SqlStore
from records.store import RecordRejected, StoreError

BUSY_TIMEOUT_S = 5.0


class _Query:
    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def __call__(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self._conn.execute(sql, params).fetchall()

    def many(self, sql: str, rows: list[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)


class SqliteStore(SqlStore):
    """An SQLite file, created with its folder on first use (`create=False` requires it to exist)."""

    def __init__(self, path: str | Path, *, create: bool = True):
        super().__init__()
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a folder, expected a call records database file")
        if not create and not self.path.is_file():
            raise StoreError(f"{self.path}: no call records database here (no such file)")
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            # The writer's thread writes and readers on other threads read through the same store; the
            # store's lock serializes them, so the connection may cross threads.
            self._conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            self._use_wal()
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._migrate(str(self.path))
        except sqlite3.DatabaseError as exc:
            self._close_quietly()
            raise StoreError(f"{self.path}: not a usable call records database ({exc})") from exc
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot create the call records database ({exc.strerror})") from exc

    def _use_wal(self) -> None:
        """Switch the file to WAL. SQLite answers this pragma "locked" at once, without waiting out the
        busy timeout, while another connection is opening the same new file; so it is retried here."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[_Query]:
        conn = self._conn
        # IMMEDIATE takes the write lock up front, so a write never fails midway on a lock it cannot get.
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield _Query(conn)
        except BaseException as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the transaction is gone with whatever broke it
            # A value SQLite cannot store, or a broken constraint, is the op's fault: retrying cannot help.
            if isinstance(exc, (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.DataError, OverflowError)):
                raise RecordRejected(str(exc)) from exc
            raise
        conn.execute("COMMIT")

    def _has_table(self, q, name: str) -> bool:
        return bool(q("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)))

    def close(self) -> None:
        with self._lock:
            self._close_quietly()

    def _close_quietly(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()
            self._conn = None  # type: ignore[assignment]

