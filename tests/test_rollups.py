"""Request rollups (core/store/rollups.py): the migration's backfill equals the raw aggregates
the reports computed, on both back-ends."""

from __future__ import annotations

import random
import sqlite3
from typing import Any

from core.store.rollups import LATENCY_EDGES_MS, bucket_of
from tests.fixtures_postgres import StoreBackend

_RAW = """
select route, coalesce(target, '') as target, coalesce(client_key_id, '') as client_key_id, count(*) as requests,
       coalesce(sum(case when status_code >= 400 then 1 else 0 end), 0) as errors,
       coalesce(sum(prompt_tokens), 0) as prompt_tokens, coalesce(sum(cost_usd), 0.0) as cost_usd,
       coalesce(sum(teacher_cost_usd), 0.0) as teacher_cost_usd
from requests group by route, coalesce(target, ''), coalesce(client_key_id, '') order by 1, 2, 3
"""
_ROLLED = """
select route, target, client_key_id, sum(requests) as requests, sum(errors) as errors,
       sum(prompt_tokens) as prompt_tokens, sum(cost_usd) as cost_usd, sum(teacher_cost_usd) as teacher_cost_usd
from request_rollups group by route, target, client_key_id order by 1, 2, 3
"""


def _rows(count: int) -> list[dict[str, Any]]:
    rng = random.Random(7)
    return [{"id": f"r{i}", "created_at": 1_700_000_000.0 + i * 7.3, "route": rng.choice(["a", "b"]),
             "target": rng.choice(["teacher", "student", None]), "status_code": rng.choice([200, 200, 500]),
             "client_key_id": rng.choice(["k1", None]), "prompt_tokens": rng.randint(1, 900),
             "completion_tokens": rng.randint(1, 90), "latency_ms": rng.uniform(0.5, 5000),
             "cost_usd": rng.randint(1, 1000) / 1e6, "teacher_cost_usd": rng.randint(1, 1000) / 1e5}
            for i in range(count)]


def _rerun_backfill(backend: StoreBackend, statements: list[str] | None = None) -> None:
    """Make the store look as if it predates m008, so that reopening it migrates and backfills."""
    statements = statements or ['DROP TABLE "request_rollups"', 'DROP INDEX "idx_requests_created_at"',
                  'DROP TABLE "request_rollups_hourly"', 'DROP TABLE "request_rollups_daily"',
                  "DELETE FROM _migrations WHERE name in ('m008_request_rollups', 'm009_rollup_tiers')"]
    if backend.kind == "sqlite":
        opened = backend.open()
        path, _ = opened.path, opened.close()
        with sqlite3.connect(path) as connection:
            for statement in statements:
                connection.execute(statement)
    else:
        import psycopg

        with psycopg.connect(backend.dsn) as connection:  # type: ignore[arg-type]
            for statement in statements:
                connection.execute(statement)


def _close(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert [{k: v for k, v in r.items() if not k.endswith("usd")} for r in a] == \
           [{k: v for k, v in r.items() if not k.endswith("usd")} for r in b]
    for x, y in zip(a, b, strict=True):  # float sums in another order: equal to rounding
        assert abs(x["cost_usd"] - y["cost_usd"]) < 1e-9 and abs(x["teacher_cost_usd"] - y["teacher_cost_usd"]) < 1e-9


def test_migration_backfills_rollups_equal_to_raw_aggregates(store_backend: StoreBackend) -> None:
    store = store_backend.open()
    rows = _rows(400)
    store.insert_requests(rows)
    store.close()
    _rerun_backfill(store_backend)
    store = store_backend.open()
    rolled = store.query(_ROLLED)
    assert sum(r["requests"] for r in rolled) == 400
    _close(rolled, store.query(_RAW))
    # The histogram: each latency lands in the bucket the Python writer would pick.
    buckets = store.query("select " + ", ".join(f"sum(lat_{i:02d}) as b{i}" for i in range(len(LATENCY_EDGES_MS) + 1))
                          + " from request_rollups")[0]
    expected = [0] * (len(LATENCY_EDGES_MS) + 1)
    for r in rows:
        expected[bucket_of(r["latency_ms"])] += 1
    assert [buckets[f"b{i}"] for i in range(len(expected))] == expected


def test_bucket_edges() -> None:
    assert bucket_of(0.0) == 0 and bucket_of(1.0) == 1 and bucket_of(1e9) == len(LATENCY_EDGES_MS)


def test_writes_update_rollups_and_a_replay_counts_once(store_backend: StoreBackend) -> None:
    store = store_backend.open()
    rows = _rows(300)
    store.insert_requests(rows[:200])
    store.insert_requests(rows[150:])  # 50 replayed from the spool, 100 new
    store.insert_requests([{**rows[3], "status_code": 502, "cost_usd": 0.5}])  # a replay that rewrites a row
    rolled = store.query(_ROLLED)
    assert sum(r["requests"] for r in rolled) == 300
    _close(rolled, store.query(_RAW))


def _by(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    return sorted(({k: (float(v) if k.endswith("usd") else v) for k, v in r.items()} for r in rows),
                  key=lambda r: str(r[key]))


def test_summaries_from_rollups_equal_the_raw_queries(store_backend: StoreBackend) -> None:
    from core.store import reporting, rollup_reads

    store = store_backend.open()
    store.insert_requests(_rows(500))
    for start in (0.0, 1_700_000_000.0 + 1234.5, 1_700_000_000.0 + 3000.0):  # all, mid-minute, late
        params = rollup_reads.window_params(start)
        _close(_by(store.query(rollup_reads.SUMMARY_SQL, params), "route"),
               _by(store.query(reporting._SUMMARY_SQL, [start]), "route"))
        _close(_by(store.query(rollup_reads.KEY_SUMMARY_SQL, params), "client_key_id"),
               _by(store.query(reporting._KEY_SUMMARY_SQL, [start]), "client_key_id"))


def test_purge_keeps_rollups(store_backend: StoreBackend) -> None:
    """Decided: rollups hold no prompt or answer, so retention deletes bodies and keeps the
    counters; a report over a purged window still shows its traffic and cost."""
    store = store_backend.open()
    store.insert_requests(_rows(100))
    store.purge_before(1_700_000_000.0 + 50 * 7.3)
    assert store.count_requests() == 50
    assert sum(r["requests"] for r in store.query(_ROLLED)) == 100
