"""Stores for the records tests: SQLite always, PostgreSQL when a server answers.

PostgreSQL: CHROMA_AGENTS_TEST_POSTGRES names a server (default: the local one CI starts); the
session creates its own database there and drops it at the end. Without a server the PostgreSQL
cases skip, unless CHROMA_AGENTS_REQUIRE_POSTGRES=1 (CI), where they fail.
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from records.store import open_store

DEFAULT_POSTGRES = "postgresql://postgres:postgres@127.0.0.1:5432/postgres"


def _with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


@pytest.fixture(scope="session")
def postgres_server_url():
    """A database of this test session's own on the test server."""
    admin_url = os.environ.get("CHROMA_AGENTS_TEST_POSTGRES", DEFAULT_POSTGRES)
    try:
        admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        why = f"no PostgreSQL server answers at CHROMA_AGENTS_TEST_POSTGRES ({exc})"
        if os.environ.get("CHROMA_AGENTS_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{why}, and CHROMA_AGENTS_REQUIRE_POSTGRES=1")
        pytest.skip(why)
    dbname = f"chroma_agents_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{dbname}"')
        try:
            yield _with_database(admin_url, dbname)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def _wipe_postgres(url: str) -> None:
    with psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
        conn.execute("DROP TABLE IF EXISTS call_events, calls, schema_version")


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    """An empty database's URL: an SQLite file, or the session's PostgreSQL database, wiped."""
    if request.param == "sqlite":
        return str(tmp_path / "records" / "calls.db")
    url = request.getfixturevalue("postgres_server_url")
    _wipe_postgres(url)
    return url


@pytest.fixture
def store(store_url):
    s = open_store(store_url)
    yield s
    s.close()
