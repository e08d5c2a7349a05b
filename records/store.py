"""The storage contract for call records, and opening a store from a URL or path."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from records.model import CallEvent, CallInfo


class RecordRejected(Exception):
    """The store refused an op for what it holds (an unknown call, a field it does not have); retrying
    the same op cannot succeed. Any other exception from a store is taken as the database failing."""


class StoreError(Exception):
    """A database that cannot be opened or used (a missing file, a schema newer than this code)."""


class CallStore(Protocol):
    """Synchronous storage of calls and their events; methods run on the writer's thread."""

    def start_call(self, info: CallInfo) -> None: ...

    def add_events(self, events: list[CallEvent]) -> None: ...

    def update_call(self, call_id: str, /, **fields) -> None:
        """Set any CallInfo field except call_id."""
        ...

    def end_call(self, call_id: str, ended_at: float, end_reason: str, end_detail: str | None = None) -> None: ...

    def list_calls(
        self,
        *,
        since: float | None = None,
        agent: str | None = None,
        transport: str | None = None,
        ended_by: str | None = None,
        limit: int = 100,
    ) -> list[CallInfo]:
        """Calls newest first."""
        ...

    def get_call(self, call_id: str) -> tuple[CallInfo, list[CallEvent]] | None:
        """The call and its events in seq order, or None if unknown."""
        ...

    def mark_unfinished(
        self, end_reason: str = "crash", *, server: str | None = None, started_before: float | None = None
    ) -> list[str]:
        """End calls that have no end at their last event's time; returns their ids. `server`: only the
        calls that server took; `started_before`: only calls older than that (not those already live)."""
        ...

    def delete_before(self, cutoff: float) -> list[CallInfo]:
        """Delete calls started before cutoff; returns them so their recordings can be removed."""
        ...

    def iter_calls(
        self,
        *,
        since: float | None = None,
        agent: str | None = None,
        transport: str | None = None,
        ended_by: str | None = None,
        batch: int = 500,
    ) -> Iterator[tuple[CallInfo, list[CallEvent]]]:
        """Every matching call with its events, oldest first (exports); reads a batch of calls at a time."""
        ...

    def close(self) -> None: ...


def open_store(url: str, *, create: bool = True) -> CallStore:
    """A file path or sqlite:///path opens SQLite; postgresql://... opens PostgreSQL. `create=False`: an
    SQLite file must exist already (for readers, which should not make an empty database)."""
    if url.startswith(("postgresql://", "postgres://")):
        from records.postgres import PostgresStore

        return PostgresStore(url)
    from records.sqlite import SqliteStore

    # sqlite:///abs/path, sqlite://rel/path and sqlite:rel/path name a file, as does a bare path.
    for prefix in ("sqlite://", "sqlite:"):
        if url.startswith(prefix):
            url = url[len(prefix) :]
            break
    return SqliteStore(url, create=create)
