"""Where the relay keeps its state: SQLite in the data directory (one process), or PostgreSQL (replicas)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from relay.store.base import Store


def is_postgres_url(url: str) -> bool:
    return urlsplit(url).scheme in ("postgresql", "postgres")


def store_for(data_dir: Path, database_url: str = "", *, replica_id: str | None = None) -> Store:
    """The store a relay (or a CLI command) with these settings uses; not opened yet."""
    if database_url:
        if not is_postgres_url(database_url):
            scheme = urlsplit(database_url).scheme or database_url
            raise ValueError(f"database_url must be a postgresql:// URL, not {scheme!r}")
        from relay.store.postgres import PostgresStore

        return PostgresStore(database_url, replica_id=replica_id)
    from relay.store.sqlite import SqliteStore

    return SqliteStore(data_dir / "relay.sqlite3", replica_id=replica_id)
