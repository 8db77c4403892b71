"""Seeding a SQLite store with millions of logged requests fast enough to measure (bench/report.py
``--seed sql``): SQLite generates the rows itself (a recursive CTE, its ``random()``), in time
order, a transaction per 500k rows, one shadow comparison per 10 requests; then each rollup
tier is filled by one INSERT ... SELECT, as migrations m008/m009/m012 backfill the request and
shadow tiers (their own SQL). The score tiers' bucket is
computed in SQL as ``ceil(32 * log2(score))`` clamped to the edges, which equals
``score_rollups.bucket_of`` for every score not within float error of an edge; ``check_buckets``
verifies that on a sample. The writer path itself (1M rows: 222 s) is bench/report.py's default.
"""

from __future__ import annotations

import math
import time
from typing import Any

from core.store import rollups, score_rollups, shadow_rollups

_UNIFORM = "((random() & 65535) / 65536.0)"
_REQUESTS = f"""
with recursive seq(i) as (select ? union all select i + 1 from seq where i < ?)
insert into requests (id, created_at, route, target, status_code, client_key_id, prompt_tokens, completion_tokens,
                      latency_ms, cost_usd, teacher_cost_usd, router_score, request_json, response_json)
select printf('r%010d', i), ? + i * ?, char(97 + (random() & 65535) % 3),
       case when random() & 1 then 'student' else 'teacher' end,
       case when (random() & 31) = 0 then 500 else 200 end,
       case random() & 3 when 0 then 'k1' when 1 then 'k2' else null end,
       10 + (random() & 511), 10 + (random() & 255), exp(5 + ({_UNIFORM} - 0.5) * 4),
       (random() & 65535) / 6.5536e7, (random() & 65535) / 6.5536e6,
       round(0.05 + 0.95 * {_UNIFORM} * {_UNIFORM}, 4), ?, ?
from seq
"""
_SHADOW = f"""
insert into shadow_results (request_id, created_at, route, router_score, agree, served_by, cost_usd,
                            student_answer, teacher_answer)
select id, created_at + 2.0, route, router_score, case when {_UNIFORM} > router_score * 0.3 then 1 else 0 end,
       target, teacher_cost_usd, ?, ?
from requests where rowid > ? and rowid % 10 = 0
"""
_OFFSET = score_rollups.SCORE_EDGES.index(1.0)  # bucket of a score in (2**(-1/32), 1]
BUCKET_SQL = (f"case when router_score <= 0 then 0 else min(max(cast(ceil({score_rollups.STEPS_PER_OCTAVE} * "
              f"log2(router_score)) as integer) + {_OFFSET}, 1), {len(score_rollups.SCORE_EDGES)}) end")
_SCORE_MINUTES = f"""
insert into score_rollups (minute, route, bucket, requests, comparisons, agreements)
select m, route, b, sum(r), sum(c), sum(a) from (
  select cast(created_at / 60 as integer) as m, route, {BUCKET_SQL} as b, 1 as r, 0 as c, 0 as a
  from requests where router_score is not null
  union all
  select cast(created_at / 60 as integer), route, {BUCKET_SQL}, 0, 1, coalesce(agree, 0)
  from shadow_results where router_score is not null) scored
group by m, route, b
"""


def _score_coarsen(tier: Any) -> str:
    width = tier.seconds // 60
    return (f"insert into {tier.table} ({tier.key}, route, bucket, requests, comparisons, agreements) "
            f"select cast(minute / {width} as integer), route, bucket, sum(requests), sum(comparisons), "
            f"sum(agreements) from score_rollups group by 1, route, bucket")


def seed(connection: Any, rows: int, now: float, span_s: float, body_bytes: int, chunk: int = 500_000) -> dict[str, float]:
    """Seed ``rows`` requests over ``span_s`` up to ``now`` into an empty, migrated store's
    sqlite3 ``connection``; returns the seconds each stage took."""
    body, took = "x" * body_bytes, {}
    began = time.perf_counter()
    step = span_s / rows
    for start in range(0, rows, chunk):
        end = min(rows, start + chunk) - 1
        with connection:
            last = connection.execute("select coalesce(max(rowid), 0) from requests").fetchone()[0]
            connection.execute(_REQUESTS, [start, end, now - span_s, step, body, body])
            connection.execute(_SHADOW, [body, body, last])
    took["rows_s"] = time.perf_counter() - began
    began = time.perf_counter()
    with connection:
        for tier in rollups.TIERS + score_rollups.TIERS + shadow_rollups.TIERS:
            connection.execute(f"delete from {tier.table}")
        connection.execute(rollups.backfill_sql("cast(created_at / 60 as integer)"))
        for tier in rollups.TIERS[1:]:
            connection.execute(rollups.coarsen_sql(tier, f"cast(minute / {tier.seconds // 60} as integer)"))
        connection.execute(_SCORE_MINUTES)
        for tier in score_rollups.TIERS[1:]:
            connection.execute(_score_coarsen(tier))
        for tier in shadow_rollups.TIERS:
            connection.execute(shadow_rollups.backfill_sql(tier, f"cast(created_at / {tier.seconds} as integer)"))
    took["rollups_s"] = time.perf_counter() - began
    return {name: round(value, 1) for name, value in took.items()}


def check_buckets(connection: Any, sample: int = 200_000) -> int:
    """How many of a sample of scores SQL buckets differently from ``bucket_of`` (0 expected)."""
    rows = connection.execute(f"select router_score, {BUCKET_SQL} from requests where router_score is not null "
                              f"limit {sample}").fetchall()
    return sum(1 for score, bucket in rows if score_rollups.bucket_of(score) != bucket and not math.isnan(score))
