"""Ordered schema migrations shared by both back-ends, each recorded in ``_migrations`` once
applied.

Every schema change is a new function appended to ``MIGRATIONS``; never edit an old one. A
migration describes tables through a :class:`Schema` (types as Python types); the dialect
(core/store/dialect.py) turns that into SQLite's or PostgreSQL's DDL, so one list serves both.
Why not Alembic: it would bring SQLAlchemy for seven small table definitions, and its version
table would not know the ``_migrations`` rows that existing SQLite stores already carry.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from core.store.dialect import Dialect


class Connection(Protocol):
    """What the runner needs from a back-end's connection."""

    dialect: Dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def transaction(self) -> contextlib.AbstractContextManager[None]: ...

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Held while migrating: two processes starting at once never migrate twice."""
        ...


class Schema:
    """What a migration may do, in portable terms."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.dialect = connection.dialect

    def create_table(self, name: str, columns: dict[str, type], pk: str | tuple[str, ...]) -> None:
        """``pk`` a single ``int`` column: a key the database numbers itself."""
        serial = isinstance(pk, str) and columns[pk] is int
        parts = []
        for column, python_type in columns.items():
            kind = self.dialect.serial_key if serial and column == pk else self.dialect.column_type(python_type)
            if not serial and column == pk:
                kind += " PRIMARY KEY"
            parts.append(f'"{column}" {kind}')
        if isinstance(pk, tuple):
            parts.append(f"PRIMARY KEY ({_quoted(pk)})")
        self.execute(f'CREATE TABLE "{name}" ({", ".join(parts)})')

    def create_index(self, table: str, columns: list[str]) -> None:
        # sqlite-utils' naming, so that stores created before the port have the same indexes.
        name = f"idx_{table}_{'_'.join(columns)}"
        self.execute(f'CREATE INDEX "{name}" ON "{table}" ({_quoted(columns)})')

    def add_column(self, table: str, column: str, python_type: type) -> None:
        self.execute(f'ALTER TABLE "{table}" ADD COLUMN "{column}" {self.dialect.column_type(python_type)}')

    def execute(self, sql: str) -> None:
        """Portable SQL (no placeholders)."""
        self.connection.execute(sql)


def m001_requests(db: Schema) -> None:
    db.create_table("requests",
        {
            "id": str,
            "created_at": float,
            "route": str,
            "target": str,
            "student_version": str,
            "router_score": float,
            "decision_reasons": str,
            "fallback": int,
            "stream": int,
            "status_code": int,
            "error": str,
            "request_json": str,
            "response_json": str,
            "prompt_tokens": int,
            "completion_tokens": int,
            "latency_ms": float,
            "upstream_latency_ms": float,
            "cost_usd": float,
            "teacher_cost_usd": float,
            "teacher_model": str,
            "client_key_id": str,
        },
        "id",
    )
    db.create_index("requests", ["route", "created_at"])
    db.create_index("requests", ["route", "target", "created_at"])


def m002_shadow(db: Schema) -> None:
    db.create_table("shadow_results",
        {
            "id": int,
            "request_id": str,
            "created_at": float,
            "route": str,
            "student_version": str,
            "router_score": float,
            "student_answer": str,
            "teacher_answer": str,
            "teacher_response_json": str,
            "agree": int,
            "cost_usd": float,
        },
        "id",
    )
    db.create_index("shadow_results", ["route", "created_at"])


def m003_route_settings(db: Schema) -> None:
    db.create_table("route_overrides",
        {"route": str, "field": str, "value_json": str, "updated_at": float}, ("route", "field")
    )
    db.create_table("route_audit",
        {
            "id": int,
            "route": str,
            "actor": str,
            "field": str,
            "old_json": str,
            "new_json": str,
            "at": float,
        },
        "id",
    )


def m004_versions(db: Schema) -> None:
    db.create_table("student_versions",
        {
            "route": str,
            "version": str,
            "status": str,
            "parent": str,
            "adapter_path": str,
            "detector_path": str,
            "metrics_json": str,
            "train_examples": int,
            "holdout_examples": int,
            "created_at": float,
            "promoted_at": float,
            "note": str,
        },
        ("route", "version"),
    )
    db.create_table("training_runs",
        {
            "id": int,
            "route": str,
            "started_at": float,
            "finished_at": float,
            "outcome": str,
            "version": str,
            "detail_json": str,
        },
        "id",
    )


def m005_version_reservations(db: Schema) -> None:
    """Version numbers taken by training runs still going (see SQLiteStore.reserve_version_number)."""
    db.create_table("version_reservations",
        {"route": str, "number": int, "host": str, "pid": int, "reserved_at": float}, ("route", "number")
    )


def m006_sec_train_trusted(db: Schema) -> None:
    """Which rows may become training data (the caller's key is trusted for training). Rows
    logged before this existed count as trusted only when no key sent them (an open gateway)."""
    db.add_column("requests", "train_trusted", int)
    db.execute("update requests set train_trusted = case when client_key_id is null then 1 else 0 end")


def m007_feedback(db: Schema) -> None:
    """Client feedback on logged requests: ratings, scores and corrected answers. ``route`` and
    ``target`` are copied from the request so that reports and retention need no join, and
    ``train_trusted`` is the giving key's trust: only a trusted key's correction is trained on."""
    db.create_table("feedback",
        {
            "id": int,
            "request_id": str,
            "route": str,
            "target": str,
            "client_key_id": str,
            "train_trusted": int,
            "rating": str,
            "score": float,
            "correction": str,
            "comment": str,
            "created_at": float,
        },
        "id",
    )
    db.create_index("feedback", ["request_id"])
    db.create_index("feedback", ["route", "created_at"])


def m008_request_rollups(db: Schema) -> None:
    """Per-minute rollups of the request log (core/store/rollups.py), backfilled from the rows
    already there so that an existing store's reports keep their history."""
    from core.store import rollups

    db.create_table("request_rollups", rollups.columns(), tuple(rollups.KEY_COLUMNS))
    db.create_index("request_rollups", ["minute"])
    # The window's part-minute is read from the raw rows by time alone (no route): an index for it.
    db.create_index("requests", ["created_at"])
    db.execute(rollups.backfill_sql(db.dialect.floor_div("created_at", "60")))


def m009_rollup_tiers(db: Schema) -> None:
    """Hourly and daily rollups (core/store/rollups.py ``TIERS``), so that a week's or the whole
    log's report reads days, not minutes; backfilled from the minute rollups, which m008 filled."""
    from core.store import rollups

    for tier in (rollups.HOUR, rollups.DAY):
        db.create_table(tier.table, rollups.columns(tier), tuple(tier.key_columns))
        db.execute(rollups.coarsen_sql(tier, db.dialect.floor_div("minute", str(tier.seconds // 60))))


def m010_shadow_served_by(db: Schema) -> None:
    """Who served the compared request (``student``: its answer reached the client and the
    teacher was asked after; ``teacher``: the student was asked after). The two agreements
    differ a lot: what clients got, past the cascade, against what the student says unchecked."""
    db.add_column("shadow_results", "served_by", str)
    db.execute("update shadow_results set served_by = "
               "(select target from requests where requests.id = shadow_results.request_id)")


def m011_score_rollups(db: Schema) -> None:
    """Router-score histograms per route and minute, hour and day (core/store/score_rollups.py),
    which the route page's calibration curve reads; backfilled from the request and shadow logs."""
    from core.store import score_rollups

    for tier in score_rollups.TIERS:
        db.create_table(tier.table, score_rollups.columns(tier), tuple(score_rollups.key_columns(tier)))
    score_rollups.backfill(db.connection.execute, db.dialect.placeholder)


def m012_shadow_rollups(db: Schema) -> None:
    """Shadow-comparison counts per route and minute, hour and day (core/store/shadow_rollups.py),
    which the reports' shadow figures read; backfilled from the shadow log. The index serves the
    window's part-minute, read from the raw rows by time alone."""
    from core.store import shadow_rollups

    for tier in shadow_rollups.TIERS:
        db.create_table(tier.table, shadow_rollups.columns(tier), tuple(shadow_rollups.key_columns(tier)))
        db.execute(shadow_rollups.backfill_sql(tier, db.dialect.floor_div("created_at", str(tier.seconds))))
    db.create_index("shadow_results", ["created_at"])


MIGRATIONS: list[Callable[[Schema], None]] = [
    m001_requests,
    m002_shadow,
    m003_route_settings,
    m004_versions,
    m005_version_reservations,
    m006_sec_train_trusted,
    m007_feedback,
    m008_request_rollups,
    m009_rollup_tiers,
    m010_shadow_served_by,
    m011_score_rollups,
    m012_shadow_rollups,
]


def migrate(connection: Connection) -> list[str]:
    """Apply pending migrations in order, each in its own transaction; returns the names applied now."""
    placeholder = connection.dialect.placeholder
    float_type = connection.dialect.column_type(float)
    with connection.exclusive():
        connection.execute(f'CREATE TABLE IF NOT EXISTS "_migrations" ("name" TEXT PRIMARY KEY, "applied_at" {float_type})')
        done = {row[0] for row in connection.execute('SELECT "name" FROM "_migrations"')}
        applied = []
        for migration in MIGRATIONS:
            if migration.__name__ in done:
                continue
            with connection.transaction():
                migration(Schema(connection))
                connection.execute(f'INSERT INTO "_migrations" ("name", "applied_at") VALUES ({placeholder}, {placeholder})',
                                   [migration.__name__, time.time()])
            applied.append(migration.__name__)
    return applied


def _quoted(columns: Sequence[str]) -> str:
    return ", ".join(f'"{column}"' for column in columns)
