"""Persistence: the ``Store`` seam, its SQLite and PostgreSQL implementations, the batched writer.

PostgreSQL (``core.store.postgres``) is imported only when configured: psycopg is an extra.
"""

from core.store.base import Store
from core.store.common import STORE_ERRORS
from core.store.factory import open_store
from core.store.sqlite import SQLiteStore
from core.store.writer import BatchWriter

__all__ = ["STORE_ERRORS", "BatchWriter", "SQLiteStore", "Store", "open_store"]
