"""Persistence: the ``Store`` seam, its SQLite implementation and the batched writer."""

from gateway.store.base import Store
from gateway.store.sqlite import SQLiteStore
from gateway.store.writer import BatchWriter

__all__ = ["BatchWriter", "SQLiteStore", "Store"]
