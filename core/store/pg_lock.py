"""PostgreSQL advisory locks: which replica leads (runs the training scheduler), and one
migrating process at a time.

A session-level ``pg_try_advisory_lock`` is held by a connection of its own, outside the
pool: the lock lives exactly as long as that session. When the leading process dies or its
connection drops, PostgreSQL releases the lock and the next replica to ask takes it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import Any

import psycopg

logger = logging.getLogger(__name__)

# Advisory lock keys are one shared 64-bit space per database: derive ours from a namespaced
# name, so another application's locks on the same database do not collide with them.
_NAMESPACE = "distillgate:"


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for ``name`` (the same in every process and version)."""
    digest = hashlib.sha256((_NAMESPACE + name).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


MIGRATION_LOCK_KEY = lock_key("migrations")


class AdvisoryLock:
    """One named leadership lock; ``held()`` is cheap enough to call at every scheduler tick."""

    def __init__(self, dsn: str, key: int, *, connect_timeout_s: float = 5.0) -> None:
        self.dsn, self.key, self.connect_timeout_s = dsn, key, connect_timeout_s
        self._connection: psycopg.Connection[Any] | None = None
        self._holding = False
        self._mutex = threading.Lock()

    def held(self) -> bool:
        with self._mutex:
            try:
                return self._check_or_take()
            except psycopg.Error as error:  # the session (and with it the lock) is gone
                if self._holding:
                    logger.warning("leadership lost with the database session", extra={"error": str(error)})
                self._drop()
                return False

    def _check_or_take(self) -> bool:
        if self._connection is None or self._connection.closed:
            self._drop()
            self._connection = psycopg.connect(self.dsn, autocommit=True, connect_timeout=int(self.connect_timeout_s))
        if self._holding:
            self._connection.execute("select 1")  # the session lives, so the lock is still ours
            return True
        row = self._connection.execute("select pg_try_advisory_lock(%s)", [self.key]).fetchone()
        self._holding = bool(row and row[0])
        if self._holding:
            logger.info("leadership taken", extra={"lock_key": self.key})
        return self._holding

    def _drop(self) -> None:
        self._holding = False
        if self._connection is not None:
            try:
                self._connection.close()
            except psycopg.Error:
                pass
            self._connection = None

    def release(self) -> None:
        """Give the lock up. Unlocked explicitly: a closed session frees it too, but only once the
        server has noticed, and the next replica may ask before that."""
        with self._mutex:
            if self._holding and self._connection is not None and not self._connection.closed:
                try:
                    self._connection.execute("select pg_advisory_unlock(%s)", [self.key])
                except psycopg.Error:
                    pass  # the session is gone, and the lock with it
            self._drop()
