"""Seeding a PostgreSQL store with millions of logged requests (bench/report.py ``--seed sql
--dsn ...``): the server generates the rows itself (``generate_series``, its ``random()``) with
bench/report_seed.py's distributions (its SQLite seed), in time order, a transaction per
``chunk`` rows, one shadow comparison per 10 requests; then each rollup tier is filled by one
INSERT ... SELECT: the request and shadow tiers by migrations m008/m009/m012's own backfill SQL
in PostgreSQL's dialect, the score tiers by report_seed's bucket formula (``ln / ln 2`` for
SQLite's ``log2``; ``check_buckets`` compares it with ``score_rollups.bucket_of`` on a sample).
The writer's path (1M rows: 683 s) would take about two hours for 10M on a 2-core machine.
"""

from __future__ import annotations

import math
import time
from typing import Any

from core.store import rollups, score_rollups, shadow_rollups
from core.store.dialect import POSTGRES

_UNIFORM = "random()"
_REQUESTS = f"""
insert into requests (id, created_at, route, target, status_code, client_key_id, prompt_tokens, completion_tokens,
                      latency_ms, cost_usd, teacher_cost_usd, router_score, request_json, response_json)
select 'r' || lpad(i::text, 10, '0'), %s + i * %s, chr(97 + floor(random() * 3)::int),
       case when random() < 0.5 then 'student' else 'teacher' end,
       case when random() < 1.0 / 32 then 500 else 200 end,
       case floor(random() * 4)::int when 0 then 'k1' when 1 then 'k2' else null end,
       10 + floor(random() * 512)::int, 10 + floor(random() * 256)::int, exp(5 + ({_UNIFORM} - 0.5) * 4),
       random() / 1e3, random() / 1e2,
       round((0.05 + 0.95 * {_UNIFORM} * {_UNIFORM})::numeric, 4)::double precision, %s, %s
from generate_series(%s::bigint, %s::bigint) as i
"""
# One comparison per request whose number ends in 0 (the SQLite seed: rowid % 10 = 0).
_SHADOW = f"""
insert into shadow_results (request_id, created_at, route, router_score, agree, served_by, cost_usd,
                            student_answer, teacher_answer)
select id, created_at + 2.0, route, router_score, case when {_UNIFORM} > router_score * 0.3 then 1 else 0 end,
       target, teacher_cost_usd, %s, %s
from requests where id between %s and %s and right(id, 1) = '0'
"""
_OFFSET = score_rollups.SCORE_EDGES.index(1.0)  # bucket of a score in (2**(-1/32), 1]
BUCKET_SQL = (f"case when router_score <= 0 then 0 else least(greatest(cast(ceil({score_rollups.STEPS_PER_OCTAVE} * "
              f"ln(router_score) / ln(2)) as integer) + {_OFFSET}, 1), {len(score_rollups.SCORE_EDGES)}) end")
_MINUTE = POSTGRES.floor_div("created_at", "60")
_SCORE_MINUTES = f"""
insert into score_rollups (minute, route, bucket, requests, comparisons, agreements)
select m, route, b, sum(r), sum(c), sum(a) from (
  select {_MINUTE} as m, route, {BUCKET_SQL} as b, 1 as r, 0 as c, 0 as a
  from requests where router_score is not null
  union all
  select {_MINUTE}, route, {BUCKET_SQL}, 0, 1, coalesce(agree, 0)
  from shadow_results where router_score is not null) scored
group by m, route, b
"""


def _score_coarsen(tier: Any) -> str:
    key = POSTGRES.floor_div("minute", str(tier.seconds // 60))
    return (f"insert into {tier.table} ({tier.key}, route, bucket, requests, comparisons, agreements) "
            f"select {key}, route, bucket, sum(requests), sum(comparisons), sum(agreements) "
            f"from score_rollups group by 1, route, bucket")


def _rollup_statements() -> list[str]:
    """Every tier emptied, then filled from the logs (request and shadow tiers: the migrations' SQL)."""
    tiers = rollups.TIERS + score_rollups.TIERS + shadow_rollups.TIERS
    statements = [f"delete from {tier.table}" for tier in tiers]
    statements.append(rollups.backfill_sql(_MINUTE))
    statements += [rollups.coarsen_sql(tier, POSTGRES.floor_div("minute", str(tier.seconds // 60)))
                   for tier in rollups.TIERS[1:]]
    statements.append(_SCORE_MINUTES)
    statements += [_score_coarsen(tier) for tier in score_rollups.TIERS[1:]]
    statements += [shadow_rollups.backfill_sql(tier, POSTGRES.floor_div("created_at", str(tier.seconds)))
                   for tier in shadow_rollups.TIERS]
    return statements


def seed(store: Any, rows: int, now: float, span_s: float, body_bytes: int, chunk: int = 500_000,
         progress: Any = None) -> dict[str, float]:
    """Seed ``rows`` requests over ``span_s`` up to ``now`` into an empty, migrated PostgresStore;
    returns the seconds each stage took. ``progress(done)`` is called after each chunk."""
    body, took = "x" * body_bytes, {}
    began = time.perf_counter()
    step = span_s / rows
    for start in range(0, rows, chunk):
        end = min(rows, start + chunk) - 1
        with store._cursor() as cursor:
            cursor.execute(_REQUESTS, [now - span_s, step, body, body, start, end])
            cursor.execute(_SHADOW, [body, body, f"r{start:010d}", f"r{end:010d}"])
        if progress:
            progress(end + 1)
    took["rows_s"] = time.perf_counter() - began
    began = time.perf_counter()
    with store._cursor() as cursor:
        cursor.execute("analyze requests")
        cursor.execute("analyze shadow_results")
        for statement in _rollup_statements():
            cursor.execute(statement)
    took["rollups_s"] = time.perf_counter() - began
    return {name: round(value, 1) for name, value in took.items()}


def check_buckets(store: Any, sample: int = 200_000) -> int:
    """How many of a sample of scores SQL buckets differently from ``bucket_of`` (0 expected)."""
    rows = store.query(f"select router_score as s, {BUCKET_SQL} as b from requests where router_score is not null "
                       f"limit {sample}")
    return sum(1 for row in rows if score_rollups.bucket_of(row["s"]) != row["b"] and not math.isnan(row["s"]))
