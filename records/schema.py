"""The call records schema, shared by SQLite and PostgreSQL, and its migrations.

One DDL for both databases: `DOUBLE PRECISION` is a float8 in PostgreSQL and has REAL affinity in
SQLite; event data and transport ids are JSON kept as TEXT, so what is read back is exactly what was
written on either database. The `schema_version` table holds one row per applied migration.
"""

from __future__ import annotations

# Each migration is (version, what it does, statements). Append only: a released migration never changes.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "calls and their events",
        [
            """CREATE TABLE calls (
                call_id TEXT PRIMARY KEY,
                agent TEXT NOT NULL,
                transport TEXT NOT NULL,
                started_at DOUBLE PRECISION NOT NULL,
                transport_ids TEXT NOT NULL,
                caller TEXT,
                callee TEXT,
                voice TEXT,
                direction TEXT NOT NULL,
                answered_at DOUBLE PRECISION,
                ended_at DOUBLE PRECISION,
                end_reason TEXT,
                end_detail TEXT,
                recording TEXT
            )""",
            """CREATE TABLE call_events (
                call_id TEXT NOT NULL REFERENCES calls (call_id) ON DELETE CASCADE,
                seq BIGINT NOT NULL,
                at DOUBLE PRECISION NOT NULL,
                kind TEXT NOT NULL,
                data TEXT NOT NULL,
                PRIMARY KEY (call_id, seq)
            )""",
            "CREATE INDEX calls_started_at ON calls (started_at)",
            "CREATE INDEX calls_unfinished ON calls (started_at) WHERE ended_at IS NULL",
        ],
    ),
    (2, "the server that took each call", ["ALTER TABLE calls ADD COLUMN server TEXT"]),
]

LATEST_VERSION = MIGRATIONS[-1][0]

CREATE_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at DOUBLE PRECISION NOT NULL
)"""


def pending_migrations(current: int) -> list[tuple[int, str, list[str]]]:
    """The migrations a database at version `current` still needs, in order."""
    return [m for m in MIGRATIONS if m[0] > current]
