"""A slow and a stopped records database: the call goes on without a gap the caller hears (the Twilio
line's gap check), records queue and are written once the database answers again, and what cannot
be kept is counted in /metrics.

The database here is the real SQLite store behind a switch: while "stopped" every call to it fails as
a dropped connection's would, and "slow" sleeps before each call. (Stopping the machine's PostgreSQL
server would stop it for every other test using it.)"""

import asyncio
import re
import time

import httpx

from agent.runtime import AgentRuntime
from agent.server import create_app
from agent.spec import load_agent
from agent.testing.lines import serving
from records.recorder import CallRecords
from records.sqlite import SqliteStore
from tests.agent.test_twilio_call import PUBLIC, dial, wait_call
from tests.agent.test_twilio_call import agent_file as twilio_agent_file
from tests.speech import requires_espeak, synthesize

WRITES = ("start_call", "add_events", "update_call", "end_call", "mark_unfinished", "delete_before")


class Database:
    def __init__(self, path):
        self.path = path
        self.stopped = False
        self.delay = 0.0

    def open(self):
        if self.stopped:
            raise ConnectionError("connection refused: the database is stopped")
        return _Switched(SqliteStore(self.path), self)


class _Switched:
    def __init__(self, store, database: Database):
        self._store, self._db = store, database

    def __getattr__(self, name):
        method = getattr(self._store, name)
        if name not in WRITES:
            return method

        def call(*args, **kwargs):
            if self._db.stopped:
                raise ConnectionError("server closed the connection unexpectedly")
            time.sleep(self._db.delay)
            return method(*args, **kwargs)

        return call


def runtime_on(tmp_path, tiny_model, database: Database, max_queue: int = 10_000) -> AgentRuntime:
    runtime = AgentRuntime(load_agent(twilio_agent_file(tmp_path)), model=tiny_model)
    runtime.records = CallRecords(runtime.records.config, store_factory=database.open, max_queue=max_queue)
    runtime.metrics.set_gauges("records", runtime.records.gauges)
    runtime.metrics.set_counters("records_written", runtime.records.counters)
    return runtime


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


async def a_call(runtime, host: str):
    speech = synthesize("Hello, I would like to check on my order please.", 8000)
    caller = await dial(host)
    running = asyncio.create_task(caller.run(speech, audio_at=0.3, seconds=0.3 + len(speech) / 8000 + 3.0))
    call = await wait_call(runtime, caller.call_sid)
    timeline = await running
    for _ in range(200):
        if caller.call_sid not in runtime.calls:
            break
        await asyncio.sleep(0.05)
    return call, timeline


async def until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@requires_espeak
async def test_a_stopped_database_holds_no_call_back_and_gets_its_records_once_it_is_back(tmp_path, tiny_model):
    database = Database(tmp_path / "calls.db")
    database.stopped = True
    runtime = runtime_on(tmp_path, tiny_model, database)
    async with serving(create_app(runtime, public_url=PUBLIC)) as host, httpx.AsyncClient() as http:
        call, timeline = await a_call(runtime, host)
        during = (await http.get(f"http://{host}/metrics")).text
        assert timeline.replies() and timeline.gaps() == []  # the caller heard the answer whole
        assert metric(during, "chroma_records_pending") > 5 and metric(during, "chroma_records_written_total") == 0
        assert metric(during, "chroma_records_errors_total") >= 1
        database.stopped = False
        assert await until(lambda: runtime.records.writer.pending == 0, 15), "the queued records were not written"
        after = (await http.get(f"http://{host}/metrics")).text
        one = (await http.get(f"http://{host}/api/calls/{call.record_id}")).json()
    await runtime.close()
    assert metric(after, "chroma_records_lost_total") == 0
    assert one["call"]["end_reason"] == "caller_hung_up"
    kinds = [e["kind"] for e in one["events"]]
    assert {"caller_turn_started", "caller_turn_ended", "reply_started", "first_audio", "agent_reply"} <= set(kinds)


@requires_espeak
async def test_a_slow_database_holds_no_call_back(tmp_path, tiny_model):
    database = Database(tmp_path / "calls.db")
    database.delay = 0.5  # every statement half a second
    runtime = runtime_on(tmp_path, tiny_model, database)
    async with serving(create_app(runtime, public_url=PUBLIC)) as host:
        call, timeline = await a_call(runtime, host)
        assert timeline.replies() and timeline.gaps() == []
        assert await until(lambda: runtime.records.writer.pending == 0, 20)
    await runtime.close()
    store = SqliteStore(tmp_path / "calls.db")
    try:
        info, events = store.get_call(call.record_id)
    finally:
        store.close()
    assert info.end_reason == "caller_hung_up" and "agent_reply" in [e.kind for e in events]


@requires_espeak
async def test_records_past_the_queue_limit_are_counted_lost_in_metrics(tmp_path, tiny_model):
    database = Database(tmp_path / "calls.db")
    database.stopped = True
    runtime = runtime_on(tmp_path, tiny_model, database, max_queue=5)
    async with serving(create_app(runtime, public_url=PUBLIC)) as host, httpx.AsyncClient() as http:
        _call, timeline = await a_call(runtime, host)
        text = (await http.get(f"http://{host}/metrics")).text
    assert timeline.replies() and timeline.gaps() == []
    assert metric(text, "chroma_records_pending") >= 5  # the queue's five, and what the writer holds retrying
    assert metric(text, "chroma_records_lost_total") >= 1  # what came after the queue was full
    assert "# TYPE chroma_records_lost_total counter" in text
    await runtime.close()
