"""The store and its batched writer: migrations, flush on close, back-pressure, retries, and
the ``Store`` seam's contract, each run against SQLite and a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from core.store import BatchWriter, SQLiteStore
from core.store.migrations import MIGRATIONS
from core.store.reporting import cost_series, key_summaries, route_summaries, status_counts
from tests.fixtures_postgres import StoreBackend
from tests.helpers import row


def test_migrations_apply_once_and_are_recorded(store_backend: StoreBackend) -> None:
    store_backend.open().close()
    store = store_backend.open()
    names = [r["name"] for r in store.query("select name from _migrations order by name")]
    assert names == [migration.__name__ for migration in MIGRATIONS]
    if store_backend.kind == "sqlite":
        assert store.query("pragma journal_mode")[0]["journal_mode"] == "wal"


async def test_writer_flushes_everything_on_close(store_backend: StoreBackend) -> None:
    store = store_backend.open()
    writer = BatchWriter(store.insert_requests, batch_size=7, flush_interval_s=0.01)
    writer.start()
    for index in range(100):
        await writer.log(row(index))
    await writer.close()
    assert store.count_requests() == 100 and writer.rows_written == 100


async def test_full_queue_applies_back_pressure_instead_of_dropping(store_backend: StoreBackend) -> None:
    store = store_backend.open()
    writer = BatchWriter(store.insert_requests, batch_size=2, queue_max=3)
    blocked = asyncio.Event()

    async def produce() -> None:
        for index in range(10):
            await writer.log(row(index))
        blocked.set()

    producer = asyncio.create_task(produce())
    await asyncio.sleep(0.05)
    assert not blocked.is_set() and writer.pending == 3  # waiting for room: nothing dropped
    writer.start()
    await asyncio.wait_for(producer, 5)
    await writer.close()
    assert store.count_requests() == 10


def _transient_error(kind: str) -> Exception:
    """What each back-end raises when the database, not the row, is the problem."""
    if kind == "sqlite":
        return sqlite3.OperationalError("database is locked")
    import psycopg

    return psycopg.OperationalError("connection to server was lost")


async def test_failed_writes_are_retried_until_they_succeed(store_backend: StoreBackend) -> None:
    store = store_backend.open()
    failures = {"left": 3}

    def flaky(rows: list[dict[str, Any]]) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise _transient_error(store_backend.kind)
        store.insert_requests(rows)

    writer = BatchWriter(flaky, retry_backoff_s=0.001)
    writer.start()
    await writer.log(row(1))
    await writer.close()
    assert store.count_requests() == 1 and writer.write_errors == 3 and writer.healthy


async def test_a_poison_row_is_set_aside_and_the_rest_written(store_backend: StoreBackend, tmp_path: Path) -> None:
    store = store_backend.open()
    writer = BatchWriter(store.insert_requests, flush_interval_s=0.01, dead_letter_path=tmp_path / "dead.jsonl")
    writer.start()
    for index in range(3):
        await writer.log({**row(index), "prompt_tokens": 2**70 if index == 1 else 5})  # too big for the column
    await writer.close()
    assert store.count_requests() == 2 and writer.dead_letter_rows == 1
    assert '"r1"' in (tmp_path / "dead.jsonl").read_text()


def test_live_version_switch_is_atomic(store_backend: StoreBackend) -> None:
    store = store_backend.open()
    for version in ("v1", "v2"):
        store.upsert_version({"route": "r", "version": version, "status": "candidate", "created_at": 1.0})
    store.set_live_version("r", "v1")
    store.set_live_version("r", "v2")
    assert store.live_version("r")["version"] == "v2"
    assert {v["version"]: v["status"] for v in store.versions("r")} == {"v1": "retired", "v2": "live"}
    with pytest.raises(KeyError):
        store.set_live_version("r", "v9")
    assert store.live_version("r")["version"] == "v2"  # the failed switch rolled back
    with pytest.raises(ValueError, match="unknown version status"):
        store.upsert_version({"route": "r", "version": "v3", "status": "bogus"})


def test_request_log_reads_and_counts(store_backend: StoreBackend) -> None:
    store = store_backend.open()
    teacher = [{**row(i), "route": "a", "train_trusted": 1} for i in (1, 2, 3)]
    untrusted = {**row(4), "route": "a", "train_trusted": 0}
    student = {**row(5), "route": "a", "target": "student", "train_trusted": 1, "status_code": 500}
    store.insert_requests([*teacher, untrusted, student])
    store.insert_requests([{**teacher[0], "error": "rewritten"}])  # replayed from the spool: upserted
    assert store.count_requests() == 5 and store.count_requests("a") == 5 and store.count_requests("b") == 0
    assert [r["id"] for r in store.iter_requests("a", target="teacher")] == ["r1", "r2", "r3", "r4"]
    assert [r["id"] for r in store.iter_requests("a", after=2.0, ok_only=False)] == ["r3", "r4", "r5"]
    assert next(store.iter_requests("a"))["error"] == "rewritten"
    store.insert_shadow_results([{"request_id": "r5", "created_at": 6.0, "route": "a", "agree": 1},
                                 {"request_id": "r4", "created_at": 7.0, "route": "a", "agree": 0}])
    assert [r["request_id"] for r in store.iter_shadow_results("a", after=6.5)] == ["r4"]
    # Trusted teacher answers after 1.0 (r2, r3) plus the shadow result on a trusted request (r5).
    assert store.count_new_examples("a", 1.0) == 3
    assert store.request_owner("r5") == {"id": "r5", "route": "a", "target": "student", "client_key_id": None,
                                         "student_version": None}
    assert store.request_owner("nope") is None


def test_feedback_and_corrections(store_backend: StoreBackend) -> None:
    store = store_backend.open()
    store.insert_requests([{**row(1), "route": "a"}])
    first = store.insert_feedback({"request_id": "r1", "route": "a", "target": "teacher", "train_trusted": 1,
                                   "correction": "old", "created_at": 1.0})
    second = store.insert_feedback({"request_id": "r1", "route": "a", "target": "teacher", "train_trusted": 1,
                                    "correction": "new", "created_at": 2.0})
    store.insert_feedback({"request_id": "r1", "route": "a", "train_trusted": 0, "correction": "x", "created_at": 3.0})
    assert second > first
    assert store.latest_corrections("a")["r1"]["correction"] == "new"


def test_route_overrides_are_audited(store_backend: StoreBackend) -> None:
    store = store_backend.open()
    store.set_route_overrides("a", {"ood_threshold": 0.4, "mode": "auto"}, actor="admin")
    store.set_route_overrides("a", {"ood_threshold": 0.5}, actor="admin")
    assert store.route_overrides("a") == {"ood_threshold": 0.5, "mode": "auto"}
    store.clear_route_overrides("a", ["mode"], actor="admin")
    store.record_route_event("a", "scheduler", "promote", None, {"version": "v1"})
    assert store.route_overrides("a") == {"ood_threshold": 0.5}
    audit = store.route_audit("a")
    assert [entry["field"] for entry in audit] == ["promote", "mode", "ood_threshold", "mode", "ood_threshold"]
    assert audit[2]["old_json"] == "0.4" and audit[2]["new_json"] == "0.5" and audit[1]["new_json"] == "null"


def test_training_runs_and_version_numbers(store_backend: StoreBackend) -> None:
    store = store_backend.open()
    first = store.record_training_run({"route": "a", "started_at": 1.0, "finished_at": 2.0, "outcome": "candidate"})
    store.record_training_run({"route": "a", "started_at": 3.0, "finished_at": 4.0, "outcome": "rejected"})
    assert [run["id"] for run in store.training_runs("a")][1] == first
    assert store.reserve_version_number("a") == 1
    store.upsert_version({"route": "a", "version": "v4", "status": "candidate", "created_at": 1.0})
    assert store.reserve_version_number("a") == 5


def test_retention_purges_only_old_rows(store_backend: StoreBackend) -> None:
    store = store_backend.open()
    store.insert_requests([{**row(i), "route": "a"} for i in range(10)])
    store.insert_shadow_results([{"request_id": "r1", "created_at": 1.0, "route": "a"}])
    assert store.count_before(5.0) == {"requests": 5, "shadow_results": 1, "feedback": 0}
    assert store.purge_before(5.0, batch=2) == {"requests": 5, "shadow_results": 1, "feedback": 0}
    assert store.count_requests() == 5
    store.check_writable()
    assert store.leader_lock("training-scheduler").held()


def test_reporting_reads_the_same_on_both(store_backend: StoreBackend) -> None:
    store = store_backend.open()
    rows = [{**row(i), "route": "a", "created_at": 1_000.0 + i * 30, "target": "student" if i % 2 else "teacher",
             "status_code": 500 if i == 3 else 200, "cost_usd": 0.5, "teacher_cost_usd": 1.0,
             "latency_ms": float(i), "client_key_id": "k1" if i < 4 else None} for i in range(6)]
    store.insert_requests(rows)
    [summary] = route_summaries(store, ["a"], since_s=None)
    assert (summary.requests, summary.errors, summary.student_requests) == (6, 1, 3)
    assert summary.savings_usd == pytest.approx(3.0) and 2.0 / 2 ** (1 / 8) <= summary.latency("p50") <= 2.0 * 2 ** (1 / 8)  # histogram bound
    assert isinstance(summary.requests, int) and isinstance(summary.cost_usd, float)
    assert [(k.client_key_id, k.requests) for k in key_summaries(store)] in ([("k1", 4), (None, 2)],
                                                                             [(None, 2), ("k1", 4)])
    series = cost_series(store, "a", since_s=None, now=1_000.0 + 3600)
    assert [point["bucket"] for point in series] == [960, 1020, 1080, 1140] and sum(p["requests"] for p in series) == 6
    assert series[-1]["cumulative_teacher_cost_usd"] == pytest.approx(6.0)
    assert status_counts(store) == {"200": 5, "500": 1}


def test_reopened_sqlite_file_keeps_its_rows(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    store.insert_requests([row(1)])
    store.close()
    assert SQLiteStore(tmp_path / "s.db").count_requests() == 1


def test_leader_lock_admits_one_holder_on_postgres(store_backend: StoreBackend) -> None:
    first, second = store_backend.open(), store_backend.open()
    one, other = first.leader_lock("training-scheduler"), second.leader_lock("training-scheduler")
    if store_backend.kind == "sqlite":  # one machine's store: every process leads, as before
        assert one.held() and other.held()
        return
    assert one.held() and not other.held()
    assert one.held(), "the holder keeps it"
    assert not other.held()
    assert first.leader_lock("another-job").held(), "locks are per name"
    one.release()
    assert other.held(), "released: the next to ask takes it"
    other.release()


def test_every_reporting_query_answers_alike_on_both(store_backend: StoreBackend) -> None:
    """Each reporting function, on a small log: the SQL runs on both dialects and the figures
    (and their Python types) are the same."""
    from core.store import reporting

    store = store_backend.open()
    store.insert_requests([{**row(i), "route": "a", "created_at": 100.0 + i, "router_score": i / 10,
                            "target": "student" if i % 2 else "teacher", "cost_usd": 0.25, "teacher_cost_usd": 1.0,
                            "client_key_id": "k1"} for i in range(4)])
    store.insert_shadow_results([{"request_id": "r1", "created_at": 101.0, "route": "a", "router_score": 0.1,
                                  "agree": 1, "cost_usd": 0.5, "student_version": "v1"},
                                 {"request_id": "r3", "created_at": 103.0, "route": "a", "router_score": 0.3,
                                  "agree": 0, "cost_usd": 0.5}])
    store.insert_feedback({"request_id": "r1", "route": "a", "target": "student", "rating": "down",
                           "train_trusted": 1, "created_at": 104.0})
    store.record_training_run({"route": "a", "started_at": 10.0, "finished_at": 3610.0, "outcome": "candidate",
                               "version": "v1", "detail_json": '{"train": {"device": "cuda"}}'})
    store.upsert_version({"route": "b", "version": "v1", "status": "live", "created_at": 5.0, "promoted_at": 6.0})

    [summary] = [s for s in reporting.route_summaries(store, [], since_s=None) if s.route == "a"]
    assert (summary.shadow_comparisons, summary.shadow_agreements, summary.student_thumbs_down) == (2, 1, 1)
    assert summary.training_hours == 1.0
    assert reporting.known_routes(store) == ["a", "b"]
    assert reporting.month_spend_by_key(store, now=200.0) == {"k1": 1.0}
    scores, shadow = reporting.calibration_scores(store, "a")
    assert sorted(scores) == [0.0, 0.1, 0.2, 0.3] and sorted(shadow) == [(0.1, 1), (0.3, 0)]
    assert [(r["route"], r["student_version"], r["comparisons"], r["agreements"])
            for r in sorted(reporting.shadow_tally_since(store, 0), key=lambda r: r["student_version"])] == \
        [("a", "none", 1, 0), ("a", "v1", 1, 1)]
    assert [(r["route"], r["outcome"], r["runs"]) for r in reporting.training_tally(store)] == [("a", "candidate", 1)]
    assert reporting.total_costs(store) == (1.0, 4.0)
    assert reporting.average_costs(store, "a") == (1.0, 0.25)
    assert reporting.request_costs(store) == {f"r{i}": 0.25 for i in range(4)}
    tally = reporting.loop_tally(store)
    assert (tally["shadow_requests"], tally["retrains"], tally["swaps"], len(tally["versions"])) == (2, 1, 1, 1)
    assert [(run["seconds"], run["device"]) for run in reporting.training_compute(store)] == [(3600.0, "cuda")]
    assert reporting.shadow_costs(store) == [(101.0, 0.5), (103.0, 0.5)]
    assert all(type(value) is int for value in (summary.requests, summary.errors, summary.shadow_comparisons))
