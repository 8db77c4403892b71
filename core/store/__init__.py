"""Persistence: the ``Store`` seam, its SQLite implementation and the batched writer."""

from core.store.base import Store
from core.store.sqlite import SQLiteStore
from core.store.writer import BatchWriter

__all__ = ["BatchWriter", "SQLiteStore", "Store"]
