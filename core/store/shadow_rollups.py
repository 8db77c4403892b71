"""Shadow-comparison rollups per route and minute, hour and day: what ``report`` and the
dashboard's summaries count from the shadow log (comparisons, agreements, those of answers the
student served, the shadow calls' teacher cost), so that a summary reads rollup rows instead of
every shadow row in the window (issue 15; the shadow log holds both answers' text, and with a
10 % shadow rate it grows with the traffic).

Key: (time unit, route). The writer adds each batch's sums to the three tiers in the shadow
insert's transaction (shadow rows are appended, never replaced); migration m012 made the
tiers, backfilled from the log, and indexed ``shadow_results(created_at)`` for the window's
part-minute, which is read from the raw rows (core/store/rollup_reads.py's cut).
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

from core.store import rollup_reads
from core.store.rollups import Tier, additive_upsert_sql

MINUTE = Tier("shadow_rollups", "minute", 60)
HOUR = Tier("shadow_rollups_hourly", "hour", 3600)
DAY = Tier("shadow_rollups_daily", "day", 86400)
TIERS = (MINUTE, HOUR, DAY)
COUNTERS = ["comparisons", "agreements", "served_comparisons", "served_agreements", "cost_usd"]
# One shadow row's counters, in SQL (the raw part-minute and the backfill).
_RAW_COUNTERS = ["1", "coalesce(agree, 0)", "case when served_by = 'student' then 1 else 0 end",
                 "case when served_by = 'student' then coalesce(agree, 0) else 0 end", "coalesce(cost_usd, 0.0)"]
_RAW = ", ".join(_RAW_COUNTERS)


class _Queryable(Protocol):
    def query(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> list[dict[str, Any]]: ...


def key_columns(tier: Tier) -> list[str]:
    return [tier.key, "route"]


def columns(tier: Tier) -> dict[str, type]:
    return {tier.key: int, "route": str, **{name: (float if name == "cost_usd" else int) for name in COUNTERS}}


def deltas(rows: list[dict[str, Any]]) -> dict[Tier, list[list[Any]]]:
    """What appending ``rows`` adds to each tier, as upsert parameters."""
    result: dict[Tier, list[list[Any]]] = {}
    for tier in TIERS:
        sums: dict[tuple[int, str], list[float]] = {}
        for row in rows:
            agree, served = int(row.get("agree") or 0), row.get("served_by") == "student"
            total = sums.setdefault((int(row["created_at"] // tier.seconds), row.get("route") or ""), [0, 0, 0, 0, 0.0])
            for index, value in enumerate((1, agree, int(served), agree if served else 0, row.get("cost_usd") or 0.0)):
                total[index] += value
        result[tier] = [[*key, *values] for key, values in sums.items()]
    return result


@functools.cache
def upsert_sql(tier: Tier) -> str:
    return additive_upsert_sql(tier.table, key_columns(tier), list(COUNTERS))


def write(executemany: Any, rows: list[dict[str, Any]], translate: Any = str) -> None:
    for tier, params in deltas(rows).items():
        if params:
            executemany(translate(upsert_sql(tier)), params)


def backfill_sql(tier: Tier, floor_div: str) -> str:
    """INSERT ... SELECT of the whole log into ``tier``; ``floor_div``: the dialect's
    ``created_at`` divided by the tier's width, rounded down."""
    sums = ", ".join(f"sum(c{index})" for index in range(len(COUNTERS)))
    names = ", ".join(f'"{n}"' for n in key_columns(tier) + COUNTERS)
    raw = ", ".join(f"{expression} as c{index}" for index, expression in enumerate(_RAW_COUNTERS))
    return (f'INSERT INTO "{tier.table}" ({names}) SELECT k, route, {sums} FROM '
            f"(SELECT {floor_div} as k, coalesce(route, '') as route, {raw} FROM shadow_results) rows GROUP BY k, route")


SUMMARY_SQL = ("select nullif(route, '') as route, sum(comparisons) as comparisons, sum(agreements) as agreements, "
               "sum(served_comparisons) as served_comparisons, sum(served_agreements) as served_agreements, "
               "sum(cost_usd) as shadow_cost_usd from ("
               + rollup_reads.window_sql("route, " + ", ".join(COUNTERS), tiers=TIERS)
               + "\n  union all\n  select coalesce(route, ''), " + _RAW
               + " from shadow_results where created_at >= ? and created_at < ?"
               + ") window_rows group by nullif(route, '')")


def summary(store: _Queryable, start: float) -> list[dict[str, Any]]:
    """Per route, the shadow log's counts and cost since ``start``: reporting's ``_SHADOW_SQL``
    (equal to it; tests/test_shadow_rollups.py) read from the tiers."""
    bound = rollup_reads.tier_bounds(start, TIERS)[0] * float(MINUTE.seconds)
    return store.query(SUMMARY_SQL, [*rollup_reads.window_params(start, raw=False, tiers=TIERS), start, bound])
