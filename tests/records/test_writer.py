"""RecordWriter: calls never wait on the database; a slow or stopped database delays records, a full queue
loses them countably, and nothing is dropped without being counted and logged."""

from __future__ import annotations

import asyncio
import threading
import time

import psycopg
import pytest
from loguru import logger

from records.model import CallEvent, CallInfo
from records.store import open_store
from records.writer import RecordWriter

T0 = 1_700_000_000.0
WAIT_S = 20.0  # generous: the machine is shared


class GatedStore:
    """A real store behind a gate: while `down`, every call raises (the database is stopped); while `held`
    is clear, every call waits (the database is slow)."""

    def __init__(self, real):
        self.real = real
        self.down = False
        self.held = threading.Event()
        self.held.set()
        self.calls = 0
        self.threads: set[str] = set()

    def __getattr__(self, name):
        target = getattr(self.real, name)
        if name not in {"start_call", "add_events", "update_call", "end_call"}:
            return target

        def call(*args, **kwargs):
            self.threads.add(threading.current_thread().name)
            if not self.held.wait(WAIT_S):
                raise TimeoutError("test gate never opened")
            self.calls += 1
            if self.down:
                raise ConnectionError("database is down")
            return target(*args, **kwargs)

        return call


@pytest.fixture
def db(tmp_path):
    store = open_store(str(tmp_path / "calls.db"))
    yield store
    store.close()


@pytest.fixture
def gated(tmp_path):
    return GatedStore(open_store(str(tmp_path / "writer.db")))


@pytest.fixture
def warnings():
    seen: list[str] = []
    sink = logger.add(lambda m: seen.append(m.record["message"]), level="WARNING")
    yield seen
    logger.remove(sink)


def one_call(writer: RecordWriter, call_id: str, n_events: int) -> None:
    writer.start_call(CallInfo(call_id, "support", "sip", T0))
    for i in range(n_events):
        writer.add_event(CallEvent(call_id, i, T0 + i * 0.1, "turn", {"i": i}))
    writer.end_call(call_id, T0 + 60, "caller_hung_up")


async def until(predicate, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_records_are_written_in_order_on_the_writer_thread(gated):
    writer = RecordWriter(gated)
    await writer.start()
    one_call(writer, "c", 30)
    writer.update_call("c", voice="ava")
    await writer.close()
    info, events = gated.real.get_call("c")
    assert [e.seq for e in events] == list(range(30))
    assert (info.end_reason, info.voice) == ("caller_hung_up", "ava")
    assert (writer.written, writer.pending, writer.lost, writer.errors) == (33, 0, 0, 0)
    assert gated.threads == {"record-writer"}


async def test_a_slow_database_never_holds_up_the_call(gated):
    gated.held.clear()  # every store call now waits
    writer = RecordWriter(gated)
    await writer.start()
    ticks = 0

    async def audio_loop():  # stands in for a call's 20 ms audio path
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    loop_task = asyncio.create_task(audio_loop())
    one_call(writer, "c", 200)  # returns although nothing can be written
    assert writer.pending == 202 and writer.written == 0
    before = ticks
    await asyncio.sleep(0.1)
    assert ticks > before  # the event loop runs on while the writer's thread waits on the store
    gated.held.set()
    await until(lambda: writer.pending == 0)
    loop_task.cancel()
    await writer.close()
    assert len(gated.real.get_call("c")[1]) == 200
    assert writer.lost == 0


async def test_a_stopped_database_gets_its_records_when_it_comes_back(gated, warnings):
    gated.down = True
    writer = RecordWriter(gated)
    await writer.start()
    one_call(writer, "c", 20)
    await until(lambda: writer.errors >= 3)  # it keeps retrying
    assert writer.written == 0 and writer.pending == 22 and writer.lost == 0
    gated.down = False
    await until(lambda: writer.pending == 0)
    await writer.close()
    info, events = gated.real.get_call("c")
    assert len(events) == 20 and info.end_reason == "caller_hung_up"
    assert writer.lost == 0
    failures = [w for w in warnings if "record store failed" in w]
    assert len(failures) == 1  # one warning per outage, not per retry


async def test_a_full_queue_counts_and_logs_what_it_loses_once_per_call(gated, warnings):
    writer = RecordWriter(gated, max_queue=10)  # not started yet: nothing leaves the queue
    writer.start_call(CallInfo("a", "support", "sip", T0))
    for i in range(14):
        writer.add_event(CallEvent("a", i, T0, "turn", {}))
    writer.add_event(CallEvent("b", 0, T0, "turn", {}))
    assert (writer.pending, writer.lost) == (10, 6)
    lost_logs = [w for w in warnings if "records lost" in w]
    assert len(lost_logs) == 2 and "call a" in lost_logs[0] and "call b" in lost_logs[1]
    await writer.start()
    await writer.close()
    assert writer.written == 10
    assert [e.seq for e in gated.real.get_call("a")[1]] == list(range(9))


async def test_overflow_while_the_database_is_down_loses_only_the_overflow(gated):
    gated.down = True
    writer = RecordWriter(gated, max_queue=50)
    await writer.start()
    one_call(writer, "c", 100)  # 102 ops
    # The queue holds 50 and the writer's thread at most one batch, stuck on the first failing write.
    assert writer.lost >= 2
    gated.down = False
    await until(lambda: writer.pending == 0)
    await writer.close()
    assert writer.written + writer.lost == 102
    info, events = gated.real.get_call("c")
    # Every op that was not lost is in the database: the start, some events, perhaps the end.
    assert 1 + len(events) + (info.end_reason is not None) == writer.written


async def test_a_refused_call_loses_only_its_own_events(db, warnings):
    writer = RecordWriter(db)
    writer.start_call(CallInfo("good", "support", "sip", T0))
    for i in range(5):  # interleaved, so both calls' events share one store batch
        writer.add_event(CallEvent("good", i, T0, "turn", {}))
        writer.add_event(CallEvent("never-started", i, T0, "turn", {}))
    await writer.start()
    await writer.close()
    assert len(db.get_call("good")[1]) == 5
    assert db.get_call("never-started") is None
    assert (writer.written, writer.lost) == (6, 5)
    assert len([w for w in warnings if "call never-started: records lost" in w]) == 1


async def test_close_gives_up_on_a_dead_database_and_counts_the_rest(gated, warnings):
    gated.down = True
    writer = RecordWriter(gated)
    await writer.start()
    one_call(writer, "c", 8)
    started = time.monotonic()
    await writer.close(timeout=0.3)
    assert time.monotonic() - started < WAIT_S
    assert (writer.written, writer.lost, writer.pending) == (0, 10, 0)
    assert any("unwritten" in w for w in warnings)
    writer.add_event(CallEvent("c", 99, T0, "late", {}))  # after close: counted, not queued
    assert writer.lost == 11 and writer.pending == 0


async def test_a_store_that_cannot_be_opened_yet_is_opened_on_a_retry(tmp_path):
    attempts: list[str] = []
    path = tmp_path / "calls.db"

    def factory():
        attempts.append(threading.current_thread().name)
        if len(attempts) < 3:
            raise ConnectionError("server not up yet")
        return open_store(str(path))

    writer = RecordWriter(factory)
    await writer.start()
    one_call(writer, "c", 3)
    await writer.close()
    assert attempts == ["record-writer"] * 3
    check = open_store(str(path))
    assert len(check.get_call("c")[1]) == 3
    check.close()


async def test_update_call_with_a_field_records_do_not_have_is_a_caller_bug(db):
    writer = RecordWriter(db)
    with pytest.raises(TypeError, match="colour"):
        writer.update_call("c", colour="red")
    assert writer.pending == 0


async def test_a_postgres_connection_killed_mid_call_loses_nothing(postgres_server_url):

    with psycopg.connect(postgres_server_url, autocommit=True) as admin:
        admin.execute("DROP TABLE IF EXISTS call_events, calls, schema_version")
    writer = RecordWriter(lambda: open_store(postgres_server_url))
    await writer.start()
    writer.start_call(CallInfo("c", "support", "sip", T0))
    for i in range(50):
        writer.add_event(CallEvent("c", i, T0 + i, "turn", {"i": i}))
    await until(lambda: writer.pending == 0)
    with psycopg.connect(postgres_server_url, autocommit=True) as admin:  # the database drops our session
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        )
    for i in range(50, 100):
        writer.add_event(CallEvent("c", i, T0 + i, "turn", {"i": i}))
    writer.end_call("c", T0 + 200, "caller_hung_up")
    await writer.close(timeout=WAIT_S)
    check = open_store(postgres_server_url)
    try:
        info, events = check.get_call("c")
    finally:
        check.close()
    assert [e.seq for e in events] == list(range(100))
    assert info.end_reason == "caller_hung_up"
    assert (writer.lost, writer.written) == (0, 102)
    assert writer.errors >= 1  # the first write after the kill failed and was retried
