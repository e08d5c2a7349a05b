"""Call records: what happened on each call, stored in SQLite or PostgreSQL."""
