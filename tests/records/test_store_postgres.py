"""What only the PostgreSQL store does: coming back after its connection breaks, and hiding passwords."""

from __future__ import annotations

import psycopg
import pytest

from records.model import CallInfo
from records.store import RecordRejected, StoreError, open_store


@pytest.fixture
def pg_store(postgres_server_url):
    with psycopg.connect(postgres_server_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS call_events, calls, schema_version")
    store = open_store(postgres_server_url)
    yield store
    store.close()


def test_the_store_reconnects_after_its_connection_is_killed(pg_store, postgres_server_url):
    pg_store.start_call(CallInfo("c", "a", "sip", 1.0))
    pid = pg_store._conn.info.backend_pid
    with psycopg.connect(postgres_server_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    # The op that finds the connection dead fails as a database failure (the writer retries it), not
    # as a refusal (which the writer would drop); the next one runs on a new connection.
    try:
        pg_store.update_call("c", voice="v")
    except RecordRejected:
        pytest.fail("a broken connection was taken for a refused op")
    except psycopg.OperationalError:
        pg_store.update_call("c", voice="v")
    assert pg_store.get_call("c")[0].voice == "v"
    assert pg_store._conn.info.backend_pid != pid


def test_an_unreachable_server_is_a_clear_error_without_the_password():
    url = "postgresql://someone:s3cret@127.0.0.1:9/records"  # port 9 (discard): nothing listens
    with pytest.raises(StoreError) as err:
        open_store(url)
    message = str(err.value)
    assert message.startswith("postgresql://someone@127.0.0.1:9/records: cannot use the call records database")
    assert "s3cret" not in message
