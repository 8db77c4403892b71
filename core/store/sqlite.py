"""SQLite store through sqlite-utils: WAL mode, ordered migrations, one class."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlite_utils

from core.store import rollups, score_rollups, shadow_rollups
from core.store.common import (
    PURGED_TABLES,
    check_status,
    json_or_raw,
    reservation_is_free,
    this_process,
    version_number,
)
from core.store.dialect import SQLITE
from core.store.leader import AlwaysLeader
from core.store.migrations import migrate

IN_MEMORY = ":memory:"  # SQLite's name for a database that is never a file


class SQLiteStore:
    """All persistence for one deployment. Thread-safe: one connection behind a lock."""

    dialect = SQLITE

    def __init__(self, path: str | Path, *, busy_timeout_ms: int = 5_000, durable_commits: bool = False) -> None:
        self.path = Path(path)
        if str(path) != IN_MEMORY:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not self.path.exists():  # prompts and answers: this user's only (SQLite gives -wal/-shm the same mode)
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        # Autocommit mode with explicit transactions (sqlite-utils' atomic(), savepoints when
        # nested): a half-applied promotion must roll back whole.
        connection = sqlite3.connect(str(self.path), check_same_thread=False, timeout=busy_timeout_ms / 1000,
                                     isolation_level=None)
        self.db = sqlite_utils.Database(connection)
        self.db.enable_wal()
        # NORMAL in WAL mode survives a process crash; only an OS crash can lose the last commits.
        # FULL (``durable_commits``) syncs the WAL at every commit: what the spool's ``fsync``
        # promise needs, since a committed row leaves the spool (see core/store/spool.py).
        self.db.execute(f"PRAGMA synchronous={'FULL' if durable_commits else 'NORMAL'}")
        self._lock = threading.RLock()
        with self._lock:
            migrate(_MigrationConnection(self.db))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock, self.db.atomic():
            yield

    # -- request log -------------------------------------------------------------------------
    def insert_requests(self, rows: list[dict[str, Any]]) -> None:
        """Upserted by id, and the minute, hour and day rollups updated in the same transaction."""
        rows = list({row["id"]: row for row in rows}.values())
        with self._transaction():
            old = self._old_rows([row["id"] for row in rows])
            self.db["requests"].insert_all(rows, batch_size=len(rows) or 1, replace=True)
            for tier, params in rollups.deltas(old, rows).items():
                self.db.conn.executemany(rollups.upsert_sql(tier), params)
            score_rollups.write(self.db.conn.executemany, score_rollups.request_deltas(old, rows))

    def _old_rows(self, ids: list[str]) -> list[dict[str, Any]]:
        """The rows a batch replaces (a spool replay): their rollup contribution is taken back."""
        found: list[dict[str, Any]] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            found += self.db.query(f"select {rollups.OLD_ROW_COLUMNS} from requests where id in "
                                   f"({', '.join('?' for _ in chunk)})", chunk)
        return found

    def insert_shadow_results(self, rows: list[dict[str, Any]]) -> None:
        """Appended, and the score and shadow rollups updated in the same transaction."""
        with self._transaction():
            self.db["shadow_results"].insert_all(rows, batch_size=len(rows) or 1)
            score_rollups.write(self.db.conn.executemany, score_rollups.shadow_deltas(rows))
            shadow_rollups.write(self.db.conn.executemany, rows)

    def count_requests(self, route: str | None = None) -> int:
        where, args = ("route = ?", [route]) if route else (None, None)
        with self._lock:
            return self.db["requests"].count_where(where, args) if where else self.db["requests"].count

    def count_new_examples(self, route: str, after: float) -> int:
        """Teacher answers (status 200) plus shadow results logged since ``after`` from keys
        trusted for training (others never become training data, so they must not trigger a
        cycle either): two count queries, no row read into the gateway."""
        with self._lock:
            teacher = self.db.execute(
                "select count(*) from requests where route = ? and target = 'teacher' and created_at > ? "
                "and status_code = 200 and train_trusted = 1", [route, after]).fetchone()[0]
            shadow = self.db.execute(
                "select count(*) from shadow_results join requests on requests.id = shadow_results.request_id "
                "where shadow_results.route = ? and shadow_results.created_at > ? and requests.train_trusted = 1",
                [route, after]).fetchone()[0]
        return int(teacher) + int(shadow)

    def iter_requests(
        self, route: str, *, target: str | None = None, after: float = 0.0, ok_only: bool = True
    ) -> Iterator[dict[str, Any]]:
        clauses, args = ["route = ?", "created_at > ?"], [route, after]
        if target:
            clauses.append("target = ?")
            args.append(target)
        if ok_only:
            clauses.append("status_code = 200")
        with self._lock:
            rows = list(self.db["requests"].rows_where(" and ".join(clauses), args, order_by="created_at"))
        yield from rows

    def iter_shadow_results(self, route: str, *, after: float = 0.0) -> Iterator[dict[str, Any]]:
        with self._lock:
            rows = list(
                self.db["shadow_results"].rows_where(
                    "route = ? and created_at > ?", [route, after], order_by="created_at"
                )
            )
        yield from rows

    def query(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Read-only reporting queries (report, dashboard)."""
        with self._lock:
            return list(self.db.query(sql, params))

    # -- feedback ----------------------------------------------------------------------------
    def request_owner(self, request_id: str) -> dict[str, Any] | None:
        """A logged request's ``id``, ``route``, ``target``, ``client_key_id`` and
        ``student_version``, or None."""
        with self._lock:
            rows = list(self.db.query("select id, route, target, client_key_id, student_version from requests "
                                      "where id = ?", [request_id]))
        return rows[0] if rows else None

    def insert_feedback(self, row: dict[str, Any]) -> int:
        with self._transaction():
            return int(self.db["feedback"].insert(row, alter=False).last_pk)

    def latest_corrections(self, route: str) -> dict[str, dict[str, Any]]:
        """Per request id, the newest correction from a key trusted for training
        (``correction``, ``created_at``): what the trainer learns instead of the logged answer."""
        with self._lock:
            rows = list(self.db.query(
                "select request_id, correction, created_at from feedback where route = ? and train_trusted = 1 "
                "and correction is not null order by created_at, id", [route]))
        return {row["request_id"]: row for row in rows}  # oldest first, so the newest one stays

    # -- live route settings -----------------------------------------------------------------
    def route_overrides(self, route: str) -> dict[str, Any]:
        with self._lock:
            rows = self.db["route_overrides"].rows_where("route = ?", [route])
            return {row["field"]: json_or_raw(row["value_json"]) for row in rows}

    def set_route_overrides(self, route: str, changes: dict[str, Any], actor: str) -> None:
        now = time.time()
        with self._transaction():
            current = self.route_overrides(route)
            for field, value in changes.items():
                self.db["route_overrides"].upsert(
                    {"route": route, "field": field, "value_json": json.dumps(value), "updated_at": now},
                    pk=("route", "field"),
                )
                self.db["route_audit"].insert(
                    {
                        "route": route,
                        "actor": actor,
                        "field": field,
                        "old_json": json.dumps(current.get(field)),
                        "new_json": json.dumps(value),
                        "at": now,
                    }
                )

    def clear_route_overrides(self, route: str, fields: list[str], actor: str) -> None:
        """Delete these overrides (audited with ``new_json`` null): the config applies again."""
        now = time.time()
        with self._transaction():
            current = self.route_overrides(route)
            for field in fields:
                self.db.execute("delete from route_overrides where route = ? and field = ?", [route, field])
                self.db["route_audit"].insert({"route": route, "actor": actor, "field": field,
                                               "old_json": json.dumps(current.get(field)), "new_json": "null",
                                               "at": now})

    def record_route_event(self, route: str, actor: str, action: str, old: Any, new: Any) -> None:
        """An operator or scheduler action (promote, promote --force, rollback) in the audit table."""
        with self._transaction():
            self.db["route_audit"].insert({"route": route, "actor": actor, "field": action,
                                           "old_json": json.dumps(old), "new_json": json.dumps(new), "at": time.time()})

    def route_audit(self, route: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.db["route_audit"].rows_where("route = ?", [route], order_by="id desc"))

    # -- student registry --------------------------------------------------------------------
    def upsert_version(self, row: dict[str, Any]) -> None:
        check_status(row)
        with self._transaction():
            self.db["student_versions"].upsert(row, pk=("route", "version"))

    def versions(self, route: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(
                self.db["student_versions"].rows_where("route = ?", [route], order_by="created_at desc")
            )

    def live_version(self, route: str) -> dict[str, Any] | None:
        with self._lock:
            rows = list(
                self.db["student_versions"].rows_where("route = ? and status = 'live'", [route], limit=1)
            )
        return rows[0] if rows else None

    def set_live_version(self, route: str, version: str | None) -> None:
        """Atomically make ``version`` the only live one for the route (None: no student)."""
        now = time.time()
        with self._transaction():
            self.db.execute(
                "update student_versions set status = 'retired' where route = ? and status = 'live'",
                [route],
            )
            if version is not None:
                updated = self.db.execute(
                    "update student_versions set status = 'live', promoted_at = ? "
                    "where route = ? and version = ?",
                    [now, route, version],
                ).rowcount
                if updated != 1:
                    raise KeyError(f"route {route!r} has no version {version!r}")

    def reserve_version_number(self, route: str) -> int:
        """The next version number of ``route``, reserved for this process until it exits or
        reserves again: two training runs at once (a manual ``train`` beside a scheduled
        one) never take the same number. A reservation whose process is gone is free again,
        so a rerun after a crash takes the crashed run's number (and resumes its checkpoint).
        One ``BEGIN IMMEDIATE`` transaction: concurrent processes serialize on it."""
        host, pid = this_process()
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self._drop_stale_reservations(route)
                taken = [row[0] for row in self.db.execute(
                    "select number from version_reservations where route = ?", [route]).fetchall()]
                taken += [version_number(row[0]) for row in self.db.execute(
                    "select version from student_versions where route = ?", [route]).fetchall()]
                number = max(taken, default=0) + 1
                self.db.execute("insert into version_reservations (route, number, host, pid, reserved_at) "
                                "values (?, ?, ?, ?, ?)", [route, number, host, pid, time.time()])
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        return number

    def _drop_stale_reservations(self, route: str) -> None:
        rows = self.db.execute("select number, host, pid, reserved_at from version_reservations where route = ?",
                               [route]).fetchall()
        for number, holder_host, holder_pid, reserved_at in rows:
            if reservation_is_free(holder_host, holder_pid, reserved_at):
                self.db.execute("delete from version_reservations where route = ? and number = ?", [route, number])

    def record_training_run(self, row: dict[str, Any]) -> int:
        with self._transaction():
            return self.db["training_runs"].insert(row, alter=False).last_pk

    def training_runs(self, route: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.db["training_runs"].rows_where("route = ?", [route], order_by="id desc"))

    # -- retention (store.retention_days; ``distillgate purge``) -----------------------------
    PURGED_TABLES = PURGED_TABLES

    def count_before(self, cutoff: float) -> dict[str, int]:
        """Rows logged before ``cutoff`` (epoch seconds), per table."""
        with self._lock:
            return {table: self.db[table].count_where("created_at < ?", [cutoff]) for table in self.PURGED_TABLES}

    def purge_before(self, cutoff: float, batch: int = 5_000) -> dict[str, int]:
        """Delete request, shadow and feedback rows logged before ``cutoff``, in batches so the writer is
        never held up for long; deleted content is overwritten on disk (secure_delete)."""
        deleted = dict.fromkeys(self.PURGED_TABLES, 0)
        for table in self.PURGED_TABLES:
            while True:
                with self._transaction():
                    self.db.execute("PRAGMA secure_delete = ON")
                    count = self.db.execute(
                        f"delete from {table} where rowid in "  # table names: our constant, never input
                        f"(select rowid from {table} where created_at < ? limit ?)", [cutoff, batch]).rowcount
                deleted[table] += count
                if count < batch:
                    break
        return deleted

    # -- health ------------------------------------------------------------------------------
    def check_writable(self, timeout_s: float = 0.5) -> None:
        """Raises sqlite3.Error when the database cannot take a write right now.

        On a connection of its own with a short busy timeout: a readiness probe must not
        hold the store's lock (every read and the writer wait on it) while the database is
        locked by someone else."""
        connection = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("ROLLBACK")
        finally:
            connection.close()

    def leader_lock(self, name: str) -> AlwaysLeader:
        """One machine's store: every process leads (as before PostgreSQL was supported)."""
        return AlwaysLeader()

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()


class _MigrationConnection:
    """The migration runner's view of a SQLite database (core/store/migrations.py)."""

    dialect = SQLITE

    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.db.execute(sql, list(params)).fetchall()

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        return self.db.atomic()

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # as before the port: SQLite's own locks


class ReadOnlyStore:
    """A read-only view of a store file another process writes (the demo, while the gateway
    runs): reporting queries only, never a migration or a write."""

    dialect = SQLITE

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def query(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with contextlib.closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)) as connection:
            connection.row_factory = sqlite3.Row
            return [dict(row) for row in connection.execute(sql, params)]
