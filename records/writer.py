"""Writing call records off the event loop.

Calls hand their records to a `RecordWriter`, whose methods only append to a bounded queue and return.
One thread drains the queue into the store in batches. When the store is slow the queue grows; when it
is down the thread retries with backoff and the queue grows up to its limit; past the limit an op is
counted as lost and logged once for its call. An op the store refuses for its content (`RecordRejected`)
is not retried: it is counted as lost too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from records.model import CallEvent, CallInfo
from records.store import CallStore, RecordRejected

# Ops taken from the queue per round: one round's consecutive events go to the store in one call.
BATCH_SIZE = 500
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 2.0
LOSSY_CALLS_KEPT = 10_000  # calls remembered as already warned about

_UPDATABLE = frozenset(f.name for f in dataclasses.fields(CallInfo)) - {"call_id"}


@dataclass
class _Op:
    kind: str  # "start" | "event" | "update" | "end"
    call_id: str
    payload: Any = None
    fields: dict[str, Any] = field(default_factory=dict)


class RecordWriter:
    """Queues record writes and applies them to a store on a thread of its own.

    `store_or_factory` is a store, or a callable that opens one; a factory is called on the writer's
    thread and called again until it succeeds; the writer closes a store it opened, not one it was given.
    Counters for /metrics: `written` ops stored, `pending` ops not yet stored, `lost` ops that never
    will be (queue full, refused by the store, or left at close), `errors` failed store calls.
    """

    def __init__(self, store_or_factory: CallStore | Callable[[], CallStore], max_queue: int = 10_000):
        if max_queue < 1:
            raise ValueError(f"RecordWriter max_queue: {max_queue} is not a positive number of ops")
        if callable(store_or_factory) and not hasattr(store_or_factory, "add_events"):
            self._factory: Callable[[], CallStore] | None = store_or_factory
            self._store: CallStore | None = None
        else:
            self._factory = None
            self._store = store_or_factory  # type: ignore[assignment]
        self.max_queue = max_queue
        self.written = 0
        self.lost = 0
        self.errors = 0
        self._queue: deque[_Op] = deque()
        self._in_flight = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._lossy_calls: set[str] = set()  # calls whose loss was logged: log once per call
        self._failing = False  # the store is failing: logged once until it recovers
        self._deadline = float("inf")  # set by close(): when to give up on what is left
        self._closing = threading.Event()  # wakes a retry wait early when close() is called

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + self._in_flight

    @property
    def store(self) -> CallStore | None:
        """The open store, once the writer's thread has opened it."""
        return self._store

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="record-writer", daemon=True)
        self._thread.start()

    # -- the call side: never blocks ----------------------------------------

    def start_call(self, info: CallInfo) -> None:
        self._put(_Op("start", info.call_id, payload=dataclasses.replace(info, transport_ids=dict(info.transport_ids))))

    def add_event(self, event: CallEvent) -> None:
        self._put(_Op("event", event.call_id, payload=event))

    def update_call(self, call_id: str, /, **fields: Any) -> None:
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise TypeError(f"update_call: {sorted(unknown)} are not CallInfo fields (expected some of {sorted(_UPDATABLE)})")
        self._put(_Op("update", call_id, fields=dict(fields)))

    def end_call(self, call_id: str, ended_at: float, end_reason: str, end_detail: str | None = None) -> None:
        self._put(_Op("end", call_id, fields={"ended_at": ended_at, "end_reason": end_reason, "end_detail": end_detail}))

    def _put(self, op: _Op) -> None:
        with self._cond:
            if self._stopping or len(self._queue) >= self.max_queue:
                why = "the writer is closed" if self._stopping else f"the record queue is full ({self.max_queue} ops)"
                self._lose(op.call_id, 1, why)
                return
            self._queue.append(op)
            self._cond.notify()

    def _lose(self, call_id: str, count: int, why: str) -> None:
        with self._cond:  # both the call side and the writer's thread count losses
            self.lost += count
            first = call_id not in self._lossy_calls
            if first and len(self._lossy_calls) >= LOSSY_CALLS_KEPT:  # calls that never end must not pile up
                self._lossy_calls.clear()
            self._lossy_calls.add(call_id)
        if first:
            logger.warning(f"call {call_id}: records lost ({why}); this call's record will be incomplete")

    # -- closing ------------------------------------------------------------

    async def close(self, timeout: float = 5.0) -> None:
        """Stop taking ops, write what can be written within `timeout`, count the rest as lost."""
        with self._cond:
            self._stopping = True
            self._deadline = time.monotonic() + timeout
            self._cond.notify()
        self._closing.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout + 1.0)
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
        for op in left:
            self._lose(op.call_id, 1, "the database did not take them before shutdown")
        if left:
            logger.warning(f"record writer closed with {len(left)} ops unwritten")

    # -- the writer's thread ------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._stopping:
                        self._cond.wait()
                    if not self._queue:
                        break
                    batch = [self._queue.popleft() for _ in range(min(BATCH_SIZE, len(self._queue)))]
                    self._in_flight = len(batch)
                unwritten = self._apply_with_retry(batch)
                with self._cond:
                    self._in_flight = 0
                    if unwritten:  # close()'s deadline passed: leave them for close() to count
                        self._queue.extendleft(reversed(unwritten))
                        break
        finally:
            if self._factory is not None and self._store is not None:  # a store passed in stays its owner's
                try:
                    self._store.close()
                except Exception as exc:  # noqa: BLE001 - closing must not raise out of the thread
                    logger.warning(f"record store close failed: {exc!r}")

    def _past_deadline(self) -> bool:
        return self._stopping and time.monotonic() >= self._deadline

    def _apply_with_retry(self, batch: list[_Op]) -> list[_Op]:
        """Apply the batch, retrying on store failures; what is left unwritten when closing runs out of time."""
        groups = _group(batch)
        delay = RETRY_FIRST_S
        while groups:
            if self._past_deadline():
                return [op for group in groups for op in group]
            try:
                store = self._open()
                self._apply(store, groups[0])
                groups.pop(0)
                delay = RETRY_FIRST_S
                if self._failing:
                    self._failing = False
                    logger.info(f"record store is back; {self.pending} ops queued")
            except RecordRejected as exc:
                self.errors += 1
                self._reject(groups.pop(0), exc)
            except Exception as exc:  # noqa: BLE001 - any store failure is retried: the database may come back
                self.errors += 1
                if not self._failing:
                    self._failing = True
                    logger.warning(f"record store failed ({exc!r}); retrying, records queue up to {self.max_queue} ops")
                if self._stopping:  # keep retrying at the same pace until close()'s deadline
                    time.sleep(min(delay, max(0.0, self._deadline - time.monotonic())))
                else:
                    self._closing.wait(delay)
                delay = min(delay * 2, RETRY_MAX_S)
        return []

    def _open(self) -> CallStore:
        if self._store is None:
            assert self._factory is not None
            self._store = self._factory()
        return self._store

    def _apply(self, store: CallStore, group: list[_Op]) -> None:
        op = group[0]
        if op.kind == "event":
            store.add_events([o.payload for o in group])
        elif op.kind == "start":
            store.start_call(op.payload)
        elif op.kind == "update":
            store.update_call(op.call_id, **op.fields)
        else:
            store.end_call(op.call_id, **op.fields)
        self.written += len(group)
        if op.kind == "end":
            with self._cond:
                self._lossy_calls.discard(op.call_id)

    def _reject(self, group: list[_Op], exc: RecordRejected) -> None:
        """A refused group of several calls' events is retried call by call, so only the refused call loses."""
        if group[0].kind == "event" and len({o.call_id for o in group}) > 1:
            by_call: dict[str, list[_Op]] = {}
            for o in group:
                by_call.setdefault(o.call_id, []).append(o)
            for ops in by_call.values():
                try:
                    self._apply(self._open(), ops)
                except RecordRejected as one:
                    self.errors += 1
                    self._lose(ops[0].call_id, len(ops), f"the store refused them: {one}")
                except Exception as other:  # noqa: BLE001 - a failure here loses only these ops
                    self.errors += 1
                    self._lose(ops[0].call_id, len(ops), f"the store failed: {other!r}")
            return
        self._lose(group[0].call_id, len(group), f"the store refused them: {exc}")


def _group(batch: list[_Op]) -> list[list[_Op]]:
    """Runs of consecutive events become one group (one add_events call); every other op is its own group."""
    groups: list[list[_Op]] = []
    for op in batch:
        if op.kind == "event" and groups and groups[-1][0].kind == "event":
            groups[-1].append(op)
        else:
            groups.append([op])
    return groups
