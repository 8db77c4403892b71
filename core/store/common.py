"""Rules both back-ends share: version statuses, reservations' staleness, stored JSON values,
and the errors a store raises when the database (not the row) is the problem."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from typing import Any

VERSION_STATUSES = ("candidate", "live", "retired", "rejected", "failed")
# A reservation older than this is free whoever holds it (a host that never came back).
RESERVATION_MAX_AGE_S = 86_400.0
# Tables ``store.retention_days`` purges.
PURGED_TABLES = ("requests", "shadow_results", "feedback")


def check_status(row: dict[str, Any]) -> None:
    if row.get("status") and row["status"] not in VERSION_STATUSES:
        raise ValueError(f"unknown version status {row['status']!r}")


def this_process() -> tuple[str, int]:
    """The (host, pid) a version reservation is held by."""
    return socket.gethostname(), os.getpid()


def reservation_is_free(holder_host: str, holder_pid: int, reserved_at: float) -> bool:
    """A reservation this process may drop: its own, one whose process on this host is gone,
    or one older than ``RESERVATION_MAX_AGE_S``."""
    host, pid = this_process()
    mine = holder_host == host and holder_pid == pid
    gone = holder_host == host and not pid_alive(holder_pid)
    return mine or gone or time.time() - reserved_at > RESERVATION_MAX_AGE_S


def version_number(version: str) -> int:
    return int(version[1:]) if version.startswith("v") and version[1:].isdigit() else 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def json_or_raw(text: str) -> Any:
    """A stored JSON value, or the raw text when it does not parse (the caller reports it)."""
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def _database_errors() -> tuple[type[Exception], ...]:
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)
    try:
        import psycopg
    except ImportError:  # the postgres extra is not installed: only SQLite can be in use
        return errors
    return (*errors, psycopg.Error)


# What a store call raises when the database cannot serve it (locked, full, unreachable): the
# gateway answers 503 or retries on these, whichever back-end is configured.
STORE_ERRORS = _database_errors()


def _transient_errors() -> tuple[type[Exception], ...]:
    errors: tuple[type[Exception], ...] = (sqlite3.OperationalError, OSError)
    try:
        import psycopg
    except ImportError:
        return errors
    # A lost connection, a pool with no free connection in time, a serialization failure.
    return (*errors, psycopg.OperationalError)


# Failures worth retrying as they are (the batched writer retries the whole batch).
TRANSIENT_ERRORS = _transient_errors()
