"""What only the SQLite store does: its file, WAL mode, and clear errors for a bad file."""

from __future__ import annotations

import sqlite3

import pytest

from records.model import CallInfo
from records.sqlite import SqliteStore
from records.store import StoreError, open_store


def test_the_file_and_its_folder_are_made_on_first_use_in_wal_mode(tmp_path):
    path = tmp_path / "deep" / "er" / "calls.db"
    store = open_store(str(path))
    store.start_call(CallInfo("c", "a", "file", 1.0))
    store.close()
    assert path.is_file()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT call_id FROM calls").fetchall() == [("c",)]


@pytest.mark.parametrize("prefix", ["sqlite://", "sqlite:"])
def test_sqlite_urls_name_the_same_file(tmp_path, prefix):
    path = tmp_path / "calls.db"
    store = open_store(prefix + str(path))
    store.start_call(CallInfo("c", "a", "file", 1.0))
    store.close()
    again = open_store(str(path))
    assert again.get_call("c") is not None
    again.close()


def test_a_file_that_is_not_a_database_is_named_in_the_error(tmp_path):
    path = tmp_path / "calls.db"
    path.write_bytes(b"this is not sqlite, it is a text file of some length" * 40)
    with pytest.raises(StoreError, match="calls.db: not a usable call records database"):
        open_store(str(path))


def test_a_missing_file_is_an_error_when_it_must_exist(tmp_path):
    with pytest.raises(StoreError, match="no call records database here"):
        SqliteStore(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


def test_a_reader_sees_records_while_the_writer_holds_its_connection(tmp_path):
    path = tmp_path / "calls.db"
    writer = open_store(str(path))
    reader = open_store(str(path))
    writer.start_call(CallInfo("c", "a", "sip", 1.0))
    assert reader.get_call("c") is not None
    writer.close()
    reader.close()


def test_a_folder_is_not_a_database(tmp_path):
    with pytest.raises(StoreError, match="is a folder, expected a call records database file"):
        open_store(str(tmp_path))
