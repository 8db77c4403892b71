"""Request rollups per minute, hour and day: what ``report``, ``report --by key`` and the dashboard sum,
kept as additive counters so a summary reads thousands of rollup rows instead of millions of
request rows (issue 15).

Key: (minute, route, target, student_version, client_key_id); a missing value is stored as ''
because PostgreSQL forbids NULL in a primary key. Latency is a histogram over fixed edges
``LATENCY_EDGES_MS`` (factor 2**(1/4) apart, 1 ms .. 2**18 ms): a percentile read from it is
the geometric middle of the bucket holding the nearest-rank value, within a factor 2**(1/8) of
the exact value (core/store/rollup_reads.py ``percentile``). Bucket 0 is [0, 1 ms); the last is
[2**18 ms, inf). The time key is the minute (hour, day) number: Unix time // its width.

Three tiers with the same columns, keyed by minute, hour and day (UTC) in ``TIERS``: the writer
adds each batch to all three in the request insert's transaction, so a report reads whole days
from the daily tier and only a window's edges from the finer ones (core/store/rollup_reads.py).
Migration m008 made the minute tier; m009 the hourly and daily ones, backfilled from it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from core.store.dialect import BigInt

LATENCY_EDGES_MS: list[float] = [2 ** (i / 4) for i in range(0, 73)]  # 1 ms .. 262144 ms
BUCKETS = len(LATENCY_EDGES_MS) + 1
BUCKET_COLUMNS = [f"lat_{i:02d}" for i in range(BUCKETS)]
KEY_COLUMNS = ["minute", "route", "target", "student_version", "client_key_id"]
COUNTER_COLUMNS = ["requests", "errors", "student_requests", "fallbacks", "prompt_tokens",
                   "completion_tokens", "cost_usd", "teacher_cost_usd", "latency_count"]


@dataclass(frozen=True)
class Tier:
    table: str
    key: str  # the time key's column: Unix time // seconds
    seconds: int

    @property
    def key_columns(self) -> list[str]:
        return [self.key, *KEY_COLUMNS[1:]]


MINUTE = Tier("request_rollups", "minute", 60)
HOUR = Tier("request_rollups_hourly", "hour", 3600)
DAY = Tier("request_rollups_daily", "day", 86400)
TIERS = (MINUTE, HOUR, DAY)


def columns(tier: Tier = MINUTE) -> dict[str, type]:
    cols: dict[str, type] = {tier.key: int, "route": str, "target": str, "student_version": str, "client_key_id": str}
    cols.update({name: (float if name.endswith("usd") else int) for name in COUNTER_COLUMNS})
    if tier is not MINUTE:  # an hour's or a day's tokens can pass 2**31 (m008's minutes cannot)
        cols.update({name: BigInt for name in ("prompt_tokens", "completion_tokens")})
    cols.update({name: int for name in BUCKET_COLUMNS})
    return cols


def bucket_of(latency_ms: float) -> int:
    """The histogram bucket of one latency (used by the writer, mirrored in SQL by ``_bucket_case``)."""
    index = 0
    for edge in LATENCY_EDGES_MS:
        if latency_ms < edge:
            return index
        index += 1
    return index


def _bucket_sum(index: int) -> str:
    lower = "" if index == 0 else f"latency_ms >= {LATENCY_EDGES_MS[index - 1]!r}"
    upper = "" if index == len(LATENCY_EDGES_MS) else f"latency_ms < {LATENCY_EDGES_MS[index]!r}"
    cond = " and ".join(part for part in ("latency_ms is not null", lower, upper) if part)
    return f"coalesce(sum(case when {cond} then 1 else 0 end), 0)"


def backfill_sql(floor_minute: str) -> str:
    """INSERT ... SELECT that rolls up every existing request row; ``floor_minute`` is the
    dialect's integer division of created_at by 60."""
    names = KEY_COLUMNS + COUNTER_COLUMNS + BUCKET_COLUMNS
    sums = [
        "count(*)",
        "coalesce(sum(case when status_code >= 400 then 1 else 0 end), 0)",
        "coalesce(sum(case when target = 'student' then 1 else 0 end), 0)",
        "coalesce(sum(fallback), 0)",
        "coalesce(sum(prompt_tokens), 0)",
        "coalesce(sum(completion_tokens), 0)",
        "coalesce(sum(cost_usd), 0.0)",
        "coalesce(sum(teacher_cost_usd), 0.0)",
        "coalesce(sum(case when latency_ms is not null then 1 else 0 end), 0)",
    ] + [_bucket_sum(i) for i in range(BUCKETS)]
    keys = [floor_minute, "coalesce(route, '')", "coalesce(target, '')", "coalesce(student_version, '')",
            "coalesce(client_key_id, '')"]
    quoted = ", ".join(f'"{name}"' for name in names)
    return (f'INSERT INTO "request_rollups" ({quoted}) SELECT {", ".join(keys + sums)} FROM requests '
            f"GROUP BY {', '.join(keys)}")


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (int(row["created_at"] // 60), row.get("route") or "", row.get("target") or "",
            row.get("student_version") or "", row.get("client_key_id") or "")


def _counters(row: dict[str, Any]) -> list[float]:
    latency = row.get("latency_ms")
    values: list[float] = [1, int((row.get("status_code") or 0) >= 400), int(row.get("target") == "student"),
                           row.get("fallback") or 0, row.get("prompt_tokens") or 0, row.get("completion_tokens") or 0,
                           row.get("cost_usd") or 0.0, row.get("teacher_cost_usd") or 0.0, int(latency is not None)]
    histogram = [0] * BUCKETS
    if latency is not None:
        histogram[bucket_of(latency)] = 1
    return values + histogram


def deltas(old_rows: list[dict[str, Any]], new_rows: list[dict[str, Any]]) -> dict[Tier, list[list[Any]]]:
    """What writing ``new_rows`` changes in each tier, as upsert parameters: each new row adds,
    each row it replaces (same id, a spool replay) first takes its own contribution back, so a
    replayed row is counted once. The hour and day sums are the minute sums added up."""
    sums: dict[tuple[Any, ...], list[float]] = {}
    for sign, rows in ((-1, old_rows), (1, new_rows)):
        for row in rows:
            total = sums.setdefault(_key(row), [0] * (len(COUNTER_COLUMNS) + BUCKETS))
            for index, value in enumerate(_counters(row)):
                total[index] += sign * value
    result: dict[Tier, list[list[Any]]] = {}
    for tier in TIERS:
        coarse: dict[tuple[Any, ...], list[float]] = {}
        for (minute, *rest), values in sums.items():
            total = coarse.setdefault((minute * 60 // tier.seconds, *rest), [0] * len(values))
            for index, value in enumerate(values):
                total[index] += value
        result[tier] = [[*key, *values] for key, values in coarse.items() if any(values)]
    return result


def additive_upsert_sql(table: str, keys: list[str], counters: list[str]) -> str:
    """Insert a row or add its ``counters`` to the row with the same ``keys`` (``?``
    placeholders; SQLite and PostgreSQL both accept ON CONFLICT). Every rollup table is written so."""
    names = keys + counters
    adds = ", ".join(f'"{n}" = {table}."{n}" + excluded."{n}"' for n in counters)
    return (f'INSERT INTO {table} ({", ".join(chr(34) + n + chr(34) for n in names)}) '
            f'VALUES ({", ".join("?" for _ in names)}) ON CONFLICT ({", ".join(keys)}) DO UPDATE SET {adds}')


@functools.cache
def upsert_sql(tier: Tier = MINUTE) -> str:
    return additive_upsert_sql(tier.table, tier.key_columns, COUNTER_COLUMNS + BUCKET_COLUMNS)


def coarsen_sql(tier: Tier, floor_div: str) -> str:
    """INSERT ... SELECT that fills ``tier`` from the minute rollups (migration m009's backfill);
    ``floor_div`` is the dialect's ``minute // (tier.seconds / 60)``."""
    counters = COUNTER_COLUMNS + BUCKET_COLUMNS
    keys = [floor_div, *KEY_COLUMNS[1:]]
    names = ", ".join(f'"{n}"' for n in tier.key_columns + counters)
    return (f'INSERT INTO "{tier.table}" ({names}) SELECT {", ".join(keys)}, '
            f'{", ".join(f"sum({chr(34)}{n}{chr(34)})" for n in counters)} FROM request_rollups GROUP BY {", ".join(keys)}')


# The columns a replaced row's contribution is computed from (router_score: core/store/score_rollups.py).
OLD_ROW_COLUMNS = "id, created_at, route, target, student_version, client_key_id, status_code, fallback, " \
                  "prompt_tokens, completion_tokens, cost_usd, teacher_cost_usd, latency_ms, router_score"
