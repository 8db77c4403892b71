"""Ordered schema migrations, each recorded in ``_migrations`` once applied.

Every schema change is a new function appended to ``MIGRATIONS``; never edit an old one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import sqlite_utils


def m001_requests(db: sqlite_utils.Database) -> None:
    db["requests"].create(
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
        pk="id",
    )
    db["requests"].create_index(["route", "created_at"])
    db["requests"].create_index(["route", "target", "created_at"])


def m002_shadow(db: sqlite_utils.Database) -> None:
    db["shadow_results"].create(
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
        pk="id",
    )
    db["shadow_results"].create_index(["route", "created_at"])


def m003_route_settings(db: sqlite_utils.Database) -> None:
    db["route_overrides"].create(
        {"route": str, "field": str, "value_json": str, "updated_at": float}, pk=("route", "field")
    )
    db["route_audit"].create(
        {
            "id": int,
            "route": str,
            "actor": str,
            "field": str,
            "old_json": str,
            "new_json": str,
            "at": float,
        },
        pk="id",
    )


def m004_versions(db: sqlite_utils.Database) -> None:
    db["student_versions"].create(
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
        pk=("route", "version"),
    )
    db["training_runs"].create(
        {
            "id": int,
            "route": str,
            "started_at": float,
            "finished_at": float,
            "outcome": str,
            "version": str,
            "detail_json": str,
        },
        pk="id",
    )


def m005_version_reservations(db: sqlite_utils.Database) -> None:
    """Version numbers taken by training runs still going (see SQLiteStore.reserve_version_number)."""
    db["version_reservations"].create(
        {"route": str, "number": int, "host": str, "pid": int, "reserved_at": float}, pk=("route", "number")
    )


def m006_sec_train_trusted(db: sqlite_utils.Database) -> None:
    """Which rows may become training data (the caller's key is trusted for training). Rows
    logged before this existed count as trusted only when no key sent them (an open gateway)."""
    db["requests"].add_column("train_trusted", int)
    db.execute("update requests set train_trusted = (client_key_id is null)")


def m007_feedback(db: sqlite_utils.Database) -> None:
    """Client feedback on logged requests: ratings, scores and corrected answers. ``route`` and
    ``target`` are copied from the request so that reports and retention need no join, and
    ``train_trusted`` is the giving key's trust: only a trusted key's correction is trained on."""
    db["feedback"].create(
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
        pk="id",
    )
    db["feedback"].create_index(["request_id"])
    db["feedback"].create_index(["route", "created_at"])


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    m001_requests,
    m002_shadow,
    m003_route_settings,
    m004_versions,
    m005_version_reservations,
    m006_sec_train_trusted,
    m007_feedback,
]


def migrate(db: sqlite_utils.Database) -> list[str]:
    """Apply pending migrations in order; returns the names applied now."""
    db["_migrations"].create({"name": str, "applied_at": float}, pk="name", if_not_exists=True)
    done = {row["name"] for row in db["_migrations"].rows}
    applied = []
    for migration in MIGRATIONS:
        if migration.__name__ in done:
            continue
        with db.atomic():
            migration(db)
            db["_migrations"].insert({"name": migration.__name__, "applied_at": time.time()})
        applied.append(migration.__name__)
    return applied
