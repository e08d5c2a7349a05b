"""Retention: old records go with their recordings; a recording that cannot be removed is reported."""

from __future__ import annotations

import asyncio

import pytest

from records.model import CallInfo
from records.retention import DAY_S, prune, prune_every
from records.store import open_store

NOW = 1_800_000_000.0


@pytest.fixture
def db(tmp_path):
    store = open_store(str(tmp_path / "calls.db"))
    yield store
    store.close()


def test_prune_removes_old_records_and_their_recordings_only(db, tmp_path):
    old_wav, gone_wav, new_wav = tmp_path / "old.wav", tmp_path / "gone.wav", tmp_path / "new.wav"
    old_wav.write_bytes(b"RIFF")
    new_wav.write_bytes(b"RIFF")
    db.start_call(CallInfo("old", "a", "sip", NOW - 10 * DAY_S, recording=str(old_wav)))
    db.start_call(CallInfo("gone", "a", "sip", NOW - 9 * DAY_S, recording=str(gone_wav)))  # file already missing
    db.start_call(CallInfo("unrecorded", "a", "sip", NOW - 8 * DAY_S))
    db.start_call(CallInfo("new", "a", "sip", NOW - 1 * DAY_S, recording=str(new_wav)))

    result = prune(db, 7, now=NOW)
    assert [c.call_id for c in result.calls] == ["old", "gone", "unrecorded"]
    assert (result.recordings_removed, result.recordings_failed) == (1, [])
    assert not old_wav.exists() and new_wav.exists()
    assert [c.call_id for c in db.list_calls()] == ["new"]


def test_a_recording_that_cannot_be_removed_is_reported(db, tmp_path):
    stuck = tmp_path / "stuck.wav"
    stuck.mkdir()  # a folder where the file should be: unlink fails
    db.start_call(CallInfo("old", "a", "sip", NOW - 10 * DAY_S, recording=str(stuck)))
    result = prune(db, 7, now=NOW)
    assert [c.call_id for c in result.calls] == ["old"]
    assert len(result.recordings_failed) == 1 and result.recordings_failed[0].startswith(str(stuck))


def test_a_retention_of_no_days_is_refused(db):
    with pytest.raises(ValueError, match="more than 0"):
        prune(db, 0)


async def test_pruning_in_the_background_outlives_a_failing_round(db, tmp_path):
    class FlakyStore:
        rounds = 0

        def delete_before(self, cutoff):
            FlakyStore.rounds += 1
            if FlakyStore.rounds == 1:
                raise ConnectionError("database is down")
            return db.delete_before(cutoff)

    db.start_call(CallInfo("ancient", "a", "sip", 1.0))
    task = asyncio.create_task(prune_every(FlakyStore(), 7, interval_s=0.01))
    try:
        for _ in range(2000):
            if db.get_call("ancient") is None:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert FlakyStore.rounds >= 2
    assert db.get_call("ancient") is None
