"""PostgreSQL store (psycopg 3 with a connection pool): the same ``Store`` seam as SQLite, for
several gateway replicas sharing one database.

The schema comes from the shared migrations (core/store/migrations.py), run under an
advisory lock so replicas starting together migrate once. Each method is one transaction on
a pooled connection (the pool commits on success and rolls back on an exception). The
student registry's methods live in core/store/postgres_registry.py.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from core.store import rollups, score_rollups, shadow_rollups
from core.store.common import PURGED_TABLES, json_or_raw
from core.store.dialect import POSTGRES
from core.store.migrations import migrate
from core.store.pg_lock import MIGRATION_LOCK_KEY, AdvisoryLock, lock_key
from core.store.postgres_registry import RegistryMixin


class PostgresStore(RegistryMixin):
    """All persistence for a deployment of one or more gateway replicas. Thread-safe: a pool."""

    dialect = POSTGRES
    PURGED_TABLES = PURGED_TABLES

    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 10, connect_timeout_s: float = 10.0,
                 pool_timeout_s: float = 5.0) -> None:
        self.dsn = dsn
        self._locks: list[AdvisoryLock] = []
        self._pool = ConnectionPool(dsn, min_size=min_size, max_size=max_size, timeout=pool_timeout_s,
                                    kwargs={"row_factory": dict_row}, check=ConnectionPool.check_connection,
                                    open=False, name="distillgate-store")
        self._pool.open(wait=True, timeout=connect_timeout_s)
        try:
            with self._pool.connection() as connection:
                connection.autocommit = True  # the runner opens one transaction per migration
                try:
                    migrate(_MigrationConnection(connection))
                finally:
                    connection.autocommit = False
        except BaseException:
            self._pool.close()
            raise

    @contextlib.contextmanager
    def _cursor(self, timeout_s: float | None = None) -> Iterator[psycopg.Cursor[dict[str, Any]]]:
        with self._pool.connection(timeout=timeout_s) as connection, connection.cursor() as cursor:
            yield cursor

    def _rows(self, query: str | sql.Composed, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._cursor() as cursor:
            cursor.execute(query, params)
            return cursor.fetchall()

    def _value(self, query: str, params: Sequence[Any] = ()) -> Any:
        rows = self._rows(query, params)
        return next(iter(rows[0].values())) if rows else None

    # -- request log -------------------------------------------------------------------------
    def insert_requests(self, rows: list[dict[str, Any]]) -> None:
        """Upserted by id: a row both committed and still in the spool is written once."""
        rows = list({row["id"]: row for row in rows}.values())
        if not rows:
            return
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with self._cursor() as cursor:  # one transaction: the rows and their rollups
            cursor.execute(f"select {rollups.OLD_ROW_COLUMNS} from requests where id = any(%s)", [[r["id"] for r in rows]])
            old = cursor.fetchall()
            cursor.executemany(insert_sql("requests", columns, ("id",), False),
                               [[_adapt(row.get(column)) for column in columns] for row in rows])
            for tier, params in rollups.deltas(old, rows).items():
                cursor.executemany(POSTGRES.translate(rollups.upsert_sql(tier)), params)
            score_rollups.write(cursor.executemany, score_rollups.request_deltas(old, rows), POSTGRES.translate)

    def insert_shadow_results(self, rows: list[dict[str, Any]]) -> None:
        """Appended, and the score and shadow rollups updated in the same transaction."""
        if not rows:
            return
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with self._cursor() as cursor:
            cursor.executemany(insert_sql("shadow_results", columns, (), False),
                               [[_adapt(row.get(column)) for column in columns] for row in rows])
            score_rollups.write(cursor.executemany, score_rollups.shadow_deltas(rows), POSTGRES.translate)
            shadow_rollups.write(cursor.executemany, rows, POSTGRES.translate)

    def _insert(self, table: str, rows: list[dict[str, Any]], conflict: tuple[str, ...] = (),
                returning: bool = False) -> list[Any]:
        if not rows:
            return []
        columns = list(dict.fromkeys(key for row in rows for key in row))
        query = insert_sql(table, columns, conflict, returning)
        values = [[_adapt(row.get(column)) for column in columns] for row in rows]
        with self._cursor() as cursor:
            if returning:
                cursor.execute(query, values[0])
                return [cursor.fetchone()["id"]]  # type: ignore[index]
            cursor.executemany(query, values)
        return []

    def count_requests(self, route: str | None = None) -> int:
        if route is None:
            return int(self._value("select count(*) from requests"))
        return int(self._value("select count(*) from requests where route = %s", [route]))

    def count_new_examples(self, route: str, after: float) -> int:
        """As SQLiteStore.count_new_examples: trusted teacher answers plus trusted shadow results."""
        teacher = self._value(
            "select count(*) from requests where route = %s and target = 'teacher' and created_at > %s "
            "and status_code = 200 and train_trusted = 1", [route, after])
        shadow = self._value(
            "select count(*) from shadow_results join requests on requests.id = shadow_results.request_id "
            "where shadow_results.route = %s and shadow_results.created_at > %s and requests.train_trusted = 1",
            [route, after])
        return int(teacher) + int(shadow)

    def iter_requests(
        self, route: str, *, target: str | None = None, after: float = 0.0, ok_only: bool = True
    ) -> Iterator[dict[str, Any]]:
        clauses, args = ["route = %s", "created_at > %s"], [route, after]
        if target:
            clauses.append("target = %s")
            args.append(target)
        if ok_only:
            clauses.append("status_code = 200")
        yield from self._rows(f"select * from requests where {' and '.join(clauses)} order by created_at", args)

    def iter_shadow_results(self, route: str, *, after: float = 0.0) -> Iterator[dict[str, Any]]:
        yield from self._rows("select * from shadow_results where route = %s and created_at > %s "
                              "order by created_at", [route, after])

    def query(self, sql_text: str, params: list[Any] | tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Read-only reporting queries (report, dashboard), written with ``?`` placeholders."""
        return self._rows(POSTGRES.translate(sql_text), params)

    # -- feedback ----------------------------------------------------------------------------
    def request_owner(self, request_id: str) -> dict[str, Any] | None:
        rows = self._rows("select id, route, target, client_key_id, student_version from requests where id = %s",
                          [request_id])
        return rows[0] if rows else None

    def insert_feedback(self, row: dict[str, Any]) -> int:
        return int(self._insert("feedback", [row], returning=True)[0])

    def latest_corrections(self, route: str) -> dict[str, dict[str, Any]]:
        rows = self._rows(
            "select request_id, correction, created_at from feedback where route = %s and train_trusted = 1 "
            "and correction is not null order by created_at, id", [route])
        return {row["request_id"]: row for row in rows}  # oldest first, so the newest one stays

    # -- live route settings -----------------------------------------------------------------
    def route_overrides(self, route: str) -> dict[str, Any]:
        rows = self._rows("select field, value_json from route_overrides where route = %s", [route])
        return {row["field"]: json_or_raw(row["value_json"]) for row in rows}

    def set_route_overrides(self, route: str, changes: dict[str, Any], actor: str) -> None:
        now = time.time()
        with self._cursor() as cursor:
            cursor.execute("select field, value_json from route_overrides where route = %s for update", [route])
            current = {row["field"]: json_or_raw(row["value_json"]) for row in cursor.fetchall()}
            for field, value in changes.items():
                cursor.execute(
                    "insert into route_overrides (route, field, value_json, updated_at) values (%s, %s, %s, %s) "
                    "on conflict (route, field) do update set value_json = excluded.value_json, "
                    "updated_at = excluded.updated_at", [route, field, json.dumps(value), now])
                cursor.execute(_AUDIT_SQL, [route, actor, field, json.dumps(current.get(field)), json.dumps(value), now])

    def clear_route_overrides(self, route: str, fields: list[str], actor: str) -> None:
        now = time.time()
        with self._cursor() as cursor:
            cursor.execute("select field, value_json from route_overrides where route = %s for update", [route])
            current = {row["field"]: json_or_raw(row["value_json"]) for row in cursor.fetchall()}
            for field in fields:
                cursor.execute("delete from route_overrides where route = %s and field = %s", [route, field])
                cursor.execute(_AUDIT_SQL, [route, actor, field, json.dumps(current.get(field)), "null", now])

    def record_route_event(self, route: str, actor: str, action: str, old: Any, new: Any) -> None:
        with self._cursor() as cursor:
            cursor.execute(_AUDIT_SQL, [route, actor, action, json.dumps(old), json.dumps(new), time.time()])

    def route_audit(self, route: str) -> list[dict[str, Any]]:
        return self._rows("select * from route_audit where route = %s order by id desc", [route])

    # -- retention ---------------------------------------------------------------------------
    def count_before(self, cutoff: float) -> dict[str, int]:
        return {table: int(self._value(f"select count(*) from {table} where created_at < %s", [cutoff]))
                for table in self.PURGED_TABLES}  # table names: our constant, never input

    def purge_before(self, cutoff: float, batch: int = 5_000) -> dict[str, int]:
        """Delete rows logged before ``cutoff`` in batches (one short transaction each)."""
        deleted = dict.fromkeys(self.PURGED_TABLES, 0)
        for table in self.PURGED_TABLES:
            while True:
                with self._cursor() as cursor:
                    cursor.execute(f"delete from {table} where ctid in "
                                   f"(select ctid from {table} where created_at < %s limit %s)", [cutoff, batch])
                    count = cursor.rowcount
                deleted[table] += count
                if count < batch:
                    break
        return deleted

    # -- health and leadership ---------------------------------------------------------------
    def check_writable(self, timeout_s: float = 0.5) -> None:
        """Raises psycopg.Error when the database cannot take a write now: unreachable, no
        pooled connection free in time, or a read-only standby."""
        with self._cursor(timeout_s=timeout_s) as cursor:
            cursor.execute("select pg_is_in_recovery() as standby, "
                           "current_setting('transaction_read_only') as read_only")
            state = cursor.fetchone() or {}
        if state.get("standby") or state.get("read_only") == "on":
            raise psycopg.errors.ReadOnlySqlTransaction("the database is read-only (a standby?)")

    def leader_lock(self, name: str) -> AdvisoryLock:
        """A session advisory lock named ``name``, on a connection of its own (see pg_lock.py)."""
        lock = AdvisoryLock(self.dsn, lock_key(name))
        self._locks.append(lock)
        return lock

    def close(self) -> None:
        """Close the pool and give up every lock taken through this store."""
        for lock in self._locks:
            lock.release()
        self._pool.close()


_AUDIT_SQL = ("insert into route_audit (route, actor, field, old_json, new_json, at) "
              "values (%s, %s, %s, %s, %s, %s)")


def insert_sql(table: str, columns: list[str], conflict: Sequence[str] = (), returning: bool = False) -> sql.Composed:
    """``insert`` of ``columns``; with ``conflict`` (a key), an upsert that replaces the other columns."""
    query = sql.SQL("insert into {} ({}) values ({})").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.SQL(", ").join(sql.Placeholder() * len(columns)))
    if conflict:
        updates = [sql.SQL("{0} = excluded.{0}").format(sql.Identifier(column))
                   for column in columns if column not in conflict]
        action = sql.SQL("do update set {}").format(sql.SQL(", ").join(updates)) if updates else sql.SQL("do nothing")
        query += sql.SQL(" on conflict ({}) {}").format(sql.SQL(", ").join(map(sql.Identifier, conflict)), action)
    if returning:
        query += sql.SQL(" returning id")
    return query


def _adapt(value: Any) -> Any:
    """A value as SQLite (through sqlite-utils) would have stored it: booleans as integers,
    lists and dicts as JSON text. PostgreSQL text cannot hold NUL, which SQLite keeps: it
    becomes U+FFFD rather than losing the whole row."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, dict | list | tuple):
        value = json.dumps(value)
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


class _MigrationConnection:
    """The migration runner's view of a PostgreSQL connection (core/store/migrations.py)."""

    dialect = POSTGRES

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self.connection = connection

    def execute(self, sql_text: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.connection.cursor(row_factory=psycopg.rows.tuple_row) as cursor:
            cursor.execute(sql_text.encode(), params)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []

    def transaction(self) -> contextlib.AbstractContextManager[Any]:
        return self.connection.transaction()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Replicas starting together: the first migrates, the others wait, then find it done."""
        self.execute("select pg_advisory_lock(%s)", [MIGRATION_LOCK_KEY])
        try:
            yield
        finally:
            self.execute("select pg_advisory_unlock(%s)", [MIGRATION_LOCK_KEY])
