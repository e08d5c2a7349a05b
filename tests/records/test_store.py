"""The CallStore contract, run against SQLite and PostgreSQL alike."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from records import schema, sql_store
from records.model import CallEvent, CallInfo
from records.store import RecordRejected, StoreError, open_store

T0 = 1_700_000_000.0


def call(call_id: str, started_at: float = T0, **fields) -> CallInfo:
    fields.setdefault("agent", "support")
    fields.setdefault("transport", "sip")
    return CallInfo(call_id=call_id, started_at=started_at, **fields)


def events(call_id: str, seqs, start: float = T0) -> list[CallEvent]:
    return [CallEvent(call_id, s, start + s * 0.5, "turn", {"seq": s}) for s in seqs]


def test_a_call_reads_back_with_every_field(store):
    info = CallInfo(
        call_id="CA1",
        agent="support",
        transport="twilio",
        started_at=T0 + 0.123456,
        transport_ids={"call_sid": "CA1", "stream_sid": "MZ9"},
        caller="+15550100",
        callee="+15550199",
        voice="ava",
        direction="outbound",
        answered_at=T0 + 1.5,
        recording="/var/rec/CA1.wav",
    )
    store.start_call(info)
    got, evs = store.get_call("CA1")
    assert got == info
    assert evs == []


def test_unknown_call_is_none(store):
    assert store.get_call("nope") is None


def test_events_come_back_in_seq_order_with_their_data(store):
    store.start_call(call("c"))
    data = {"text": "héllo ☎", "nested": {"list": [1, 2.5, None, True]}, "empty": {}}
    store.add_events([CallEvent("c", 2, T0 + 2, "agent_reply", data)])
    store.add_events([CallEvent("c", 0, T0, "caller_turn", {"audio_s": 1.25}), CallEvent("c", 1, T0 + 1, "barge_in", {})])
    _, evs = store.get_call("c")
    assert [(e.seq, e.kind) for e in evs] == [(0, "caller_turn"), (1, "barge_in"), (2, "agent_reply")]
    assert evs[2].data == data
    assert evs[0].at == T0 and evs[0].data == {"audio_s": 1.25}


def test_numpy_values_in_event_data_are_stored_as_numbers(store):
    store.start_call(call("c"))
    store.add_events([CallEvent("c", 0, T0, "vad", {"level": np.float32(0.5), "frames": np.int64(3), "v": np.arange(2)})])
    _, evs = store.get_call("c")
    assert evs[0].data == {"level": 0.5, "frames": 3, "v": [0, 1]}


def test_retried_writes_store_each_thing_once(store):
    # The writer retries a batch whose commit it did not see; nothing doubles.
    store.start_call(call("c", caller="+1"))
    store.start_call(call("c", caller="+1"))
    store.add_events(events("c", range(3)))
    store.add_events(events("c", range(3)))
    assert len(store.list_calls()) == 1
    assert [e.seq for e in store.get_call("c")[1]] == [0, 1, 2]


def test_events_of_a_call_never_started_are_refused_whole(store):
    store.start_call(call("known"))
    with pytest.raises(RecordRejected, match="ghost"):
        store.add_events(events("known", [0]) + events("ghost", [0]))
    assert store.get_call("known")[1] == []


def test_update_call_changes_the_named_fields(store):
    store.start_call(call("c"))
    store.update_call("c", answered_at=T0 + 2, voice="ben", transport_ids={"sip_call_id": "x@h"}, recording="r.wav")
    got, _ = store.get_call("c")
    assert (got.answered_at, got.voice, got.transport_ids, got.recording) == (T0 + 2, "ben", {"sip_call_id": "x@h"}, "r.wav")
    assert got.agent == "support" and got.ended_at is None


def test_update_call_refuses_unknown_fields_and_calls(store):
    store.start_call(call("c"))
    with pytest.raises(RecordRejected, match="colour"):
        store.update_call("c", colour="red")
    with pytest.raises(RecordRejected, match="call_id"):
        store.update_call("c", call_id="d")
    with pytest.raises(RecordRejected, match="nope"):
        store.update_call("nope", voice="x")
    with pytest.raises(RecordRejected, match="nope"):
        store.end_call("nope", T0, "agent_ended")


def test_end_call_records_when_and_why(store):
    store.start_call(call("c"))
    store.end_call("c", T0 + 30, "transferred", "sip:sales@example.com")
    got, _ = store.get_call("c")
    assert (got.ended_at, got.end_reason, got.end_detail) == (T0 + 30, "transferred", "sip:sales@example.com")


def test_list_calls_is_newest_first_and_filters(store):
    store.start_call(call("old", T0, agent="support", transport="twilio"))
    store.start_call(call("mid", T0 + 100, agent="sales", transport="sip"))
    store.start_call(call("new", T0 + 200, agent="support", transport="sip"))
    store.end_call("old", T0 + 10, "caller_hung_up")
    store.end_call("new", T0 + 210, "agent_ended")

    def ids(**kw):
        return [c.call_id for c in store.list_calls(**kw)]

    assert ids() == ["new", "mid", "old"]
    assert ids(since=T0 + 100) == ["new", "mid"]
    assert ids(agent="support") == ["new", "old"]
    assert ids(transport="sip") == ["new", "mid"]
    assert ids(ended_by="caller_hung_up") == ["old"]
    assert ids(agent="support", transport="sip", since=T0 + 1) == ["new"]
    assert ids(limit=2) == ["new", "mid"]
    assert ids(agent="nobody") == []


def test_mark_unfinished_ends_open_calls_at_their_last_event(store):
    store.start_call(call("talking", T0))
    store.add_events(events("talking", [0, 1, 7], start=T0))  # last at T0 + 3.5
    store.start_call(call("ringing", T0 + 50))
    store.start_call(call("answered", T0 + 60, answered_at=T0 + 61))
    store.start_call(call("done", T0 + 70))
    store.end_call("done", T0 + 80, "caller_hung_up")

    assert store.mark_unfinished() == ["answered", "ringing", "talking"]
    by_id = {c.call_id: c for c in store.list_calls()}
    assert (by_id["talking"].ended_at, by_id["talking"].end_reason) == (T0 + 3.5, "crash")
    assert by_id["ringing"].ended_at == T0 + 50
    assert by_id["answered"].ended_at == T0 + 61
    assert (by_id["done"].ended_at, by_id["done"].end_reason) == (T0 + 80, "caller_hung_up")
    assert store.mark_unfinished("shutdown") == []


def test_delete_before_removes_old_calls_with_their_events(store):
    store.start_call(call("old", T0, recording="/rec/old.wav"))
    store.add_events(events("old", range(4)))
    store.start_call(call("new", T0 + 1000))
    store.add_events(events("new", range(2), start=T0 + 1000))

    deleted = store.delete_before(T0 + 500)
    assert [(c.call_id, c.recording) for c in deleted] == [("old", "/rec/old.wav")]
    assert store.get_call("old") is None
    assert [c.call_id for c in store.list_calls()] == ["new"]
    assert len(store.get_call("new")[1]) == 2
    # The old call's events went with it: a new call of the same id starts empty.
    store.start_call(call("old", T0 + 2000))
    assert store.get_call("old")[1] == []
    assert store.delete_before(T0) == []


def test_iter_calls_walks_every_call_oldest_first(store):
    for i in range(7):
        store.start_call(call(f"c{i}", T0 + (i // 2)))  # pairs share a start time
        store.add_events(events(f"c{i}", [0]))
    got = [info.call_id for info, _ in store.iter_calls(batch=3)]
    assert got == [f"c{i}" for i in range(7)]
    assert [info.call_id for info, _ in store.iter_calls(since=T0 + 2, batch=3)] == ["c4", "c5", "c6"]


def test_a_new_database_is_at_the_latest_schema_version(store):
    assert store.schema_version() == schema.LATEST_VERSION


def test_reopening_keeps_records_and_does_not_migrate_again(store_url, store):
    store.start_call(call("c"))
    store.close()
    again = open_store(store_url)
    try:
        assert again.schema_version() == schema.LATEST_VERSION
        assert again.get_call("c") is not None
    finally:
        again.close()


def test_a_newer_migration_is_applied_on_open(store_url, store, monkeypatch):
    store.start_call(call("c"))
    store.close()
    extra = (schema.LATEST_VERSION + 1, "a test column", ["ALTER TABLE calls ADD COLUMN note TEXT"])
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, extra])
    monkeypatch.setattr(sql_store, "LATEST_VERSION", extra[0])
    migrated = open_store(store_url)
    try:
        assert migrated.schema_version() == extra[0]
        with migrated._transaction() as q:
            assert q("SELECT note FROM calls WHERE call_id = ?", ("c",)) == [(None,)]
    finally:
        migrated.close()


def test_a_database_from_a_newer_version_is_refused(store_url, store):
    with store._transaction() as q:
        q("INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)", (99, "future", T0))
    store.close()
    with pytest.raises(StoreError, match="schema version 99 is newer"):
        open_store(store_url)


def test_one_store_serves_the_writer_thread_and_readers(store):
    store.start_call(call("c"))
    errors: list[BaseException] = []

    def write():
        try:
            for i in range(50):
                store.add_events(events("c", [i]))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    seen = 0
    while writer.is_alive():
        seen = max(seen, len(store.get_call("c")[1]))
    writer.join(timeout=30)
    assert errors == []
    assert len(store.get_call("c")[1]) == 50


def test_iter_calls_filters_like_list_calls(store):
    store.start_call(call("a", T0, agent="support", transport="sip"))
    store.start_call(call("b", T0 + 1, agent="sales", transport="sip"))
    store.start_call(call("c", T0 + 2, agent="support", transport="twilio"))
    store.end_call("c", T0 + 3, "busy")
    assert [i.call_id for i, _ in store.iter_calls(agent="support")] == ["a", "c"]
    assert [i.call_id for i, _ in store.iter_calls(transport="sip", since=T0 + 1)] == ["b"]
    assert [i.call_id for i, _ in store.iter_calls(ended_by="busy")] == ["c"]


def test_mark_unfinished_can_keep_to_one_server_and_to_older_calls(store):
    store.start_call(call("mine", T0, server="host-a:8080"))
    store.start_call(call("theirs", T0, server="host-b:8080"))
    store.start_call(call("mine-live", T0 + 100, server="host-a:8080"))
    assert store.mark_unfinished(server="host-a:8080", started_before=T0 + 50) == ["mine"]
    open_ids = {c.call_id for c in store.list_calls() if c.ended_at is None}
    assert open_ids == {"theirs", "mine-live"}
    assert store.get_call("mine")[0].server == "host-a:8080"


def test_a_version_1_database_is_migrated_with_its_records(store_url, monkeypatch):
    with monkeypatch.context() as m:  # make the database as the first release did
        m.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
        m.setattr(sql_store, "LATEST_VERSION", 1)
        old = open_store(store_url)
        with old._transaction() as q:
            q(
                "INSERT INTO calls (call_id, agent, transport, started_at, transport_ids, direction) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                ("c", "support", "sip", T0, '{"sip_call_id": "x"}', "inbound"),
            )
        assert old.schema_version() == 1
        old.close()
    new = open_store(store_url)
    try:
        assert new.schema_version() == schema.LATEST_VERSION >= 2
        info, _ = new.get_call("c")
        assert (info.transport_ids, info.server) == ({"sip_call_id": "x"}, None)
        new.update_call("c", server="host-a:8080")
        assert new.get_call("c")[0].server == "host-a:8080"
    finally:
        new.close()


def test_servers_opening_a_new_database_at_once_migrate_it_once(store_url):
    opened, errors = [], []
    go = threading.Barrier(4)

    def open_one():
        try:
            go.wait(timeout=10)
            opened.append(open_store(store_url))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert errors == []
        with opened[0]._transaction(write=False) as q:
            versions = [r[0] for r in q("SELECT version FROM schema_version ORDER BY version")]
        assert versions == [v for v, _, _ in schema.MIGRATIONS]
    finally:
        for s in opened:
            s.close()
