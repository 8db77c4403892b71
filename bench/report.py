"""Reporting at scale (issue 15): seed N logged requests (bodies ~4 KB) into a SQLite store and
time the route and key summaries that ``report`` and the dashboard run, from the raw table
(before) and from the per-minute rollups (after), plus write throughput with and without the
rollup upsert. Prints JSON.

    PYTHONPATH=$PWD .venv/bin/python bench/report.py --rows 200000

Seeding is a bulk executemany plus the migration's backfill; 10M rows need ~45 GB of disk
(4 KB bodies) and roughly 50x this run's seeding time.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from core.store import SQLiteStore, reporting, rollups

_COLUMNS = ["id", "created_at", "route", "target", "status_code", "client_key_id", "prompt_tokens",
            "completion_tokens", "latency_ms", "cost_usd", "teacher_cost_usd", "request_json", "response_json"]


def _rows(start: int, count: int, now: float, span_s: float, rng: random.Random) -> list[dict[str, Any]]:
    body = "x" * 2000
    return [{"id": f"r{i}", "created_at": now - rng.random() * span_s, "route": rng.choice(["a", "b", "c"]),
             "target": rng.choice(["teacher", "student"]), "status_code": rng.choice([200] * 19 + [500]),
             "client_key_id": rng.choice(["k1", "k2", None]), "prompt_tokens": rng.randint(10, 900),
             "completion_tokens": rng.randint(10, 300), "latency_ms": rng.lognormvariate(5, 1),
             "cost_usd": rng.random() / 1e3, "teacher_cost_usd": rng.random() / 1e2,
             "request_json": body, "response_json": body} for i in range(start, start + count)]


def _timed(fn: Any) -> float:
    began = time.perf_counter()
    fn()
    return round((time.perf_counter() - began) * 1000, 2)


def _time_query(store: SQLiteStore, sql: str, args: list[float]) -> float:
    began = time.perf_counter()
    store.query(sql, args)
    return round((time.perf_counter() - began) * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--days", type=float, default=30.0)
    args = parser.parse_args()
    rng, now = random.Random(1), time.time()
    out: dict[str, Any] = {"rows": args.rows}
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "bench.db")
        sample = _rows(10**9, 5_000, now, args.days * 86400, rng)
        with_rollups = _timed(lambda: [store.insert_requests(sample[i:i + 100]) for i in range(0, 5_000, 100)])
        store.db.execute("delete from requests")
        store.db.execute("delete from request_rollups")
        insert = f"insert into requests ({', '.join(_COLUMNS)}) values ({', '.join('?' for _ in _COLUMNS)})"
        without = _timed(lambda: [store.db.conn.executemany(insert, [[r.get(c) for c in _COLUMNS] for r in sample[i:i + 100]])
                                  for i in range(0, 5_000, 100)])
        store.db.conn.commit()
        store.db.execute("delete from requests")
        out["insert_rows_per_s"] = {"with_rollups": round(5_000 / with_rollups * 1000), "without": round(5_000 / without * 1000)}
        seed = time.perf_counter()
        for start in range(0, args.rows, 20_000):
            rows = _rows(start, min(20_000, args.rows - start), now, args.days * 86400, rng)
            store.db.conn.executemany(insert, [[r.get(c) for c in _COLUMNS] for r in rows])
            store.db.conn.commit()
        out["seed_s"] = round(time.perf_counter() - seed, 1)
        out["backfill_ms"] = _timed(lambda: (store.db.execute(rollups.backfill_sql(store.dialect.floor_div("created_at", "60"))),
                                             store.db.conn.commit()))
        out["rollup_rows"] = store.query("select count(*) as n from request_rollups")[0]["n"]
        for window, since in (("24h", 86400.0), ("7d", 7 * 86400.0), ("all", None)):
            start = reporting.window_start(since, now)
            params = reporting._rollup_params(start)
            queries = {"route_summary_raw": (reporting._SUMMARY_SQL, [start]),
                       "route_summary_rollup": (reporting._SUMMARY_ROLLUP_SQL, params),
                       "key_summary_raw": (reporting._KEY_SUMMARY_SQL, [start]),
                       "key_summary_rollup": (reporting._KEY_SUMMARY_ROLLUP_SQL, params)}
            out[window] = {f"{name}_ms": _time_query(store, sql, args) for name, (sql, args) in queries.items()}
        store.close()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
