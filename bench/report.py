"""Reporting at scale (issue 15): seed N logged requests over ``--days`` into a store (SQLite,
or PostgreSQL with ``--dsn``) and time, per window (24h, 7d, all), what ``report``,
``report --by key`` and the dashboard's route page run, the old way (main before the tiers:
minute rollups for the counts, the raw log for the percentiles and the cost series) and the
new way (the minute/hour/day tiers, percentiles from their histograms). Also the request
insert rate with all tiers, with the minute rollups only, and with none. Prints JSON.

    PYTHONPATH=$PWD .venv/bin/python bench/report.py --rows 200000 [--body-bytes 2000] [--dsn postgresql://...]

Seeding: bulk executemany of the rows (bodies of ``--body-bytes`` characters each way), and
each 20k-row batch's rollups written with ``rollups.deltas`` + ``rollups.upsert_sql``, the
writer's own code path, in the same transaction.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from core.store import SQLiteStore, reporting, rollup_reads, rollups
from core.store.dialect import POSTGRES

_COLUMNS = ["id", "created_at", "route", "target", "status_code", "client_key_id", "prompt_tokens",
            "completion_tokens", "latency_ms", "cost_usd", "teacher_cost_usd", "request_json", "response_json"]
_INSERT = f"insert into requests ({', '.join(_COLUMNS)}) values ({', '.join('?' for _ in _COLUMNS)})"
# main's percentiles before the tiers: one rank query per route, target and quantile.
_OLD_LATENCY_GROUPS = """
select route, coalesce(target, 'none') as target, count(*) as n
from requests where created_at >= ? and latency_ms is not null group by route, coalesce(target, 'none')
union all
select route, 'all' as target, count(*) as n
from requests where created_at >= ? and latency_ms is not null group by route
"""
_OLD_LATENCY_RANK = """
select latency_ms from requests
where route = ? and (? = 'all' or coalesce(target, 'none') = ?) and created_at >= ? and latency_ms is not null
order by latency_ms limit 1 offset ?
"""
_OLD_FIRST = "select min(created_at) as first from requests where route = ? and created_at >= ?"
ROUTES = ["a", "b", "c"]


def _rows(start: int, count: int, now: float, span_s: float, rng: random.Random, body: str) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "created_at": now - rng.random() * span_s, "route": rng.choice(ROUTES),
             "target": rng.choice(["teacher", "student"]), "status_code": rng.choice([200] * 19 + [500]),
             "client_key_id": rng.choice(["k1", "k2", None]), "prompt_tokens": rng.randint(10, 900),
             "completion_tokens": rng.randint(10, 300), "latency_ms": rng.lognormvariate(5, 1),
             "cost_usd": rng.random() / 1e3, "teacher_cost_usd": rng.random() / 1e2,
             "request_json": body, "response_json": body} for i in range(start, start + count)]


def _ms(fn: Any, repeat: int = 1) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        times.append((time.perf_counter() - began) * 1000)
    return round(statistics.median(times), 2)


def _bulk(store: Any, rows: list[dict[str, Any]]) -> None:
    """The rows and their rollups (all tiers), in one transaction."""
    values = [[r.get(c) for c in _COLUMNS] for r in rows]
    if isinstance(store, SQLiteStore):
        with store.db.atomic():
            store.db.conn.executemany(_INSERT, values)
            for tier, params in rollups.deltas([], rows).items():
                store.db.conn.executemany(rollups.upsert_sql(tier), params)
        return
    with store._cursor() as cursor:
        cursor.executemany(POSTGRES.translate(_INSERT), values)
        for tier, params in rollups.deltas([], rows).items():
            cursor.executemany(POSTGRES.translate(rollups.upsert_sql(tier)), params)


def _insert_rates(store: Any, sample: list[dict[str, Any]], rounds: int = 3) -> dict[str, int]:
    """Rows/s through ``store.insert_requests`` (batches of 100) with all tiers, the minute
    tier only (main before this change) and no rollups; interleaved ``rounds`` times, median
    kept (the machine is shared); the rows are deleted after each."""
    took: dict[str, list[float]] = {}
    saved = rollups.TIERS
    for _ in range(rounds):
        for name, tiers in (("all_tiers", saved), ("minute_only", saved[:1]), ("no_rollups", ())):
            rollups.TIERS = tiers
            try:
                took.setdefault(name, []).append(
                    _ms(lambda: [store.insert_requests(sample[i:i + 100]) for i in range(0, len(sample), 100)]))
            finally:
                rollups.TIERS = saved
            for table in ["requests"] + [tier.table for tier in saved]:
                _delete(store, table)
    return {name: round(len(sample) / statistics.median(times) * 1000) for name, times in took.items()}


def _delete(store: Any, table: str) -> None:
    if isinstance(store, SQLiteStore):
        store.db.execute(f"delete from {table}")
        store.db.conn.commit()
    else:
        with store._cursor() as cursor:
            cursor.execute(f"delete from {table}")


def _old_report(store: Any, start: float) -> None:
    minute = (rollups.MINUTE,)
    store.query(rollup_reads.summary_sql(minute), rollup_reads.window_params(start, tiers=minute))
    for group in store.query(_OLD_LATENCY_GROUPS, [start, start]):
        for quantile in (0.5, 0.99):
            rank = max(0, min(group["n"] - 1, math.ceil(quantile * group["n"]) - 1))
            store.query(_OLD_LATENCY_RANK, [group["route"], group["target"], group["target"], start, rank])


def _old_route_page(store: Any, start: float, now: float) -> None:
    first = store.query(_OLD_FIRST, ["a", start])[0]["first"]
    width = reporting._bucket_seconds(now - max(start, first))
    query = reporting._COST_SERIES_SQL.format(bucket=store.dialect.floor_div("created_at", "?"))
    store.query(query, [width, width, "a", start])


def _windows(store: Any, now: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    minute = (rollups.MINUTE,)
    for window, since in (("24h", 86400.0), ("7d", 7 * 86400.0), ("all", None)):
        start = reporting.window_start(since, now)
        out[window] = {
            "old_report_ms": _ms(lambda start=start: _old_report(store, start)),
            "old_by_key_ms": _ms(lambda start=start: store.query(rollup_reads.key_summary_sql(minute),
                                                                 rollup_reads.window_params(start, tiers=minute))),
            "old_route_page_cost_series_ms": _ms(lambda start=start: _old_route_page(store, start, now)),
            "new_report_ms": _ms(lambda since=since: reporting.route_summaries(store, ROUTES, since), 3),
            "new_by_key_ms": _ms(lambda since=since: reporting.key_summaries(store, since), 3),
            "new_route_page_cost_series_ms": _ms(lambda since=since: reporting.cost_series(store, "a", since), 3),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--body-bytes", type=int, default=2000)
    parser.add_argument("--insert-sample", type=int, default=5_000, help="rows per insert-rate measurement")
    parser.add_argument("--dsn", default=None, help="a PostgreSQL database to seed (empty); SQLite in a temp dir if unset")
    args = parser.parse_args()
    rng, now, body = random.Random(1), time.time(), "x" * args.body_bytes
    out: dict[str, Any] = {"rows": args.rows, "days": args.days, "body_bytes": args.body_bytes,
                           "backend": "postgres" if args.dsn else "sqlite"}
    with tempfile.TemporaryDirectory() as tmp:
        if args.dsn:
            from core.store.postgres import PostgresStore

            store: Any = PostgresStore(args.dsn)
        else:
            store = SQLiteStore(Path(tmp) / "bench.db")
        # Live traffic: a batch's rows are seconds apart (here 20 ms), so each tier gets about
        # one upsert per route, target and key a batch, not one per row.
        sample = [{**row, "created_at": now - 100 + index * 0.02}
                  for index, row in enumerate(_rows(10**9, args.insert_sample, now, args.days * 86400, rng, body))]
        out["insert_rows_per_s"] = _insert_rates(store, sample)
        began = time.perf_counter()
        for start in range(0, args.rows, 20_000):
            _bulk(store, _rows(start, min(20_000, args.rows - start), now, args.days * 86400, rng, body))
        out["seed_s"] = round(time.perf_counter() - began, 1)
        if args.dsn:
            with store._cursor() as cursor:
                cursor.execute("analyze")
        out["rollup_rows"] = {tier.key: store.query(f"select count(*) as n from {tier.table}")[0]["n"]
                              for tier in rollups.TIERS}
        out.update(_windows(store, now))
        store.close()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
