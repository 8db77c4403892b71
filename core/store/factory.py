"""Opening the configured store: ``store.kind`` picks the back-end."""

from __future__ import annotations

from pathlib import Path

from core.config import ConfigError, StoreConfig
from core.store.base import Store
from core.store.sqlite import IN_MEMORY, SQLiteStore


def open_store(config: StoreConfig, *, durable_commits: bool = False, create: bool = True) -> Store:
    """The store ``config`` names. ``durable_commits``: SQLite syncs at every commit (a
    PostgreSQL commit is durable already). ``create=False``: a SQLite file that does not exist
    yet reads as an empty store rather than being created (``distillgate report``).
    Raises ConfigError when a PostgreSQL store is configured but cannot be used."""
    if config.kind == "sqlite":
        path: str | Path = config.path if create or Path(config.path).exists() else IN_MEMORY
        return SQLiteStore(path, busy_timeout_ms=config.busy_timeout_ms, durable_commits=durable_commits)
    try:
        from core.store.postgres import PostgresStore
    except ImportError as error:
        raise ConfigError("store.kind postgres needs psycopg and psycopg-pool: "
                          "pip install 'distillgate[postgres]'") from error
    import psycopg

    try:
        return PostgresStore(config.dsn(), min_size=config.pool_min_size, max_size=config.pool_max_size,
                             connect_timeout_s=config.connect_timeout_s, pool_timeout_s=config.pool_timeout_s)
    except psycopg.Error as error:  # PoolTimeout included: the server never answered
        raise ConfigError(f"the PostgreSQL store (DSN from {config.dsn_env}) cannot be opened: "
                          f"{type(error).__name__}: {error}") from error
