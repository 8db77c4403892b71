"""Leadership among gateway replicas: the one process that runs a singleton job (the
training scheduler). PostgreSQL holds it with an advisory lock (core/store/pg_lock.py); a
SQLite store is one machine's, where every process schedules as before."""

from __future__ import annotations

from typing import Protocol


class LeaderLock(Protocol):
    def held(self) -> bool:
        """True when this process holds the lock: takes it when free, and checks that a lock
        taken before is still held (a lost database connection loses it)."""
        ...

    def release(self) -> None: ...


class AlwaysLeader:
    """No election: the embedded store's process always leads."""

    def held(self) -> bool:
        return True

    def release(self) -> None:
        pass
