"""Retention: delete call records and their recordings older than N days."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from records.model import CallInfo
from records.store import CallStore

DAY_S = 86_400.0


@dataclass
class Pruned:
    calls: list[CallInfo] = field(default_factory=list)
    recordings_removed: int = 0
    recordings_failed: list[str] = field(default_factory=list)  # "path: why"


def prune(store: CallStore, older_than_days: float, *, now: float | None = None) -> Pruned:
    """Delete calls started more than `older_than_days` ago, then their recording files.

    Records go first: a recording whose record is gone is an orphan file, but a record whose recording
    is gone would show a call that can no longer be heard. A file already missing is not an error.
    Synchronous (database and file I/O): call it off the event loop.
    """
    if older_than_days <= 0:
        raise ValueError(f"retention: older_than_days must be more than 0, got {older_than_days}")
    cutoff = (time.time() if now is None else now) - older_than_days * DAY_S
    result = Pruned(calls=store.delete_before(cutoff))
    for call in result.calls:
        if not call.recording:
            continue
        path = Path(call.recording)
        try:
            path.unlink()
            result.recordings_removed += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            result.recordings_failed.append(f"{path}: {exc.strerror}")
    if result.calls:
        logger.info(
            f"retention: deleted {len(result.calls)} call records older than {older_than_days:g} days "
            f"and {result.recordings_removed} recordings"
        )
    for failure in result.recordings_failed:
        logger.warning(f"retention: could not remove recording {failure}")
    return result


async def prune_every(store: CallStore, older_than_days: float, interval_s: float = 3600.0) -> None:
    """Prune now and then every `interval_s` until cancelled (a server's background task)."""
    while True:
        try:
            await asyncio.to_thread(prune, store, older_than_days)
        except Exception as exc:  # noqa: BLE001 - a failed round is retried at the next; the server goes on
            logger.warning(f"retention: pruning call records failed ({exc!r}); trying again in {interval_s:g} s")
        await asyncio.sleep(interval_s)
