"""The student registry's part of the PostgreSQL store: versions, the live pointer, version
reservations and training runs (a mixin of :class:`~core.store.postgres.PostgresStore`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

from core.store.common import check_status, reservation_is_free, this_process, version_number


class _Pooled(Protocol):
    def _cursor(self, timeout_s: float | None = None) -> Any: ...

    def _rows(self, query: Any, params: Sequence[Any] = ()) -> list[dict[str, Any]]: ...

    def _insert(self, table: str, rows: list[dict[str, Any]], conflict: tuple[str, ...] = (),
                returning: bool = False) -> list[Any]: ...


class RegistryMixin:
    def upsert_version(self: _Pooled, row: dict[str, Any]) -> None:
        check_status(row)
        self._insert("student_versions", [row], conflict=("route", "version"))

    def versions(self: _Pooled, route: str) -> list[dict[str, Any]]:
        return self._rows("select * from student_versions where route = %s order by created_at desc", [route])

    def live_version(self: _Pooled, route: str) -> dict[str, Any] | None:
        rows = self._rows("select * from student_versions where route = %s and status = 'live' limit 1", [route])
        return rows[0] if rows else None

    def set_live_version(self: _Pooled, route: str, version: str | None) -> None:
        """Atomically make ``version`` the only live one for the route (None: no student)."""
        with self._cursor() as cursor:
            cursor.execute("update student_versions set status = 'retired' where route = %s and status = 'live'",
                           [route])
            if version is None:
                return
            cursor.execute("update student_versions set status = 'live', promoted_at = %s "
                           "where route = %s and version = %s", [time.time(), route, version])
            if cursor.rowcount != 1:  # raised inside the transaction: the retirement rolls back too
                raise KeyError(f"route {route!r} has no version {version!r}")

    def reserve_version_number(self: _Pooled, route: str) -> int:
        """As SQLiteStore.reserve_version_number; concurrent processes (on any replica)
        serialize on a table lock held for this one short transaction."""
        host, pid = this_process()
        with self._cursor() as cursor:
            cursor.execute("lock table version_reservations in share row exclusive mode")
            cursor.execute("select number, host, pid, reserved_at from version_reservations where route = %s",
                           [route])
            for row in cursor.fetchall():
                if reservation_is_free(row["host"], row["pid"], row["reserved_at"]):
                    cursor.execute("delete from version_reservations where route = %s and number = %s",
                                   [route, row["number"]])
            cursor.execute("select number from version_reservations where route = %s", [route])
            taken = [row["number"] for row in cursor.fetchall()]
            cursor.execute("select version from student_versions where route = %s", [route])
            taken += [version_number(row["version"]) for row in cursor.fetchall()]
            number = max(taken, default=0) + 1
            cursor.execute("insert into version_reservations (route, number, host, pid, reserved_at) "
                           "values (%s, %s, %s, %s, %s)", [route, number, host, pid, time.time()])
        return number

    def record_training_run(self: _Pooled, row: dict[str, Any]) -> int:
        return int(self._insert("training_runs", [row], returning=True)[0])

    def training_runs(self: _Pooled, route: str) -> list[dict[str, Any]]:
        return self._rows("select * from training_runs where route = %s order by id desc", [route])

