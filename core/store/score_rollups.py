"""Router-score histograms per route and minute, hour and day: what the dashboard's route page
draws the OOD-threshold calibration curve from, so that it reads at most a few thousand
rollup rows however many requests the window holds (issue 15).

Key: (time unit, route, bucket); counters: scored requests, scored shadow comparisons and
their agreements. A request counts at its own ``created_at``, a shadow comparison at the shadow
row's (as the raw queries filtered them). Rows exist only for buckets that were hit.

Buckets, over ``SCORE_EDGES`` (0, then 2**(k/32) for 2**-14 .. 2**14): bucket ``i`` holds the
scores ``SCORE_EDGES[i-1] < s <= SCORE_EDGES[i]`` (bucket 0: ``s <= 0``; the last:
``s > 2**14``). Closed on the right so that the count of scores ``<= edge`` is an exact
cumulative sum: the curve is exact at every edge, and a threshold between two edges is read at
the edge at or below it, at most a factor 2**(1/32) (2.2 %) lower (``snap``). OOD scores are
never negative (router/ood.py); every detector's unit (cosine distance ~0..2, Mahalanobis in
the tens or hundreds) falls inside the edges' range.

The writer adds a batch's contributions to all three tiers in the insert's transaction (the
request log's and the shadow log's, both back-ends); migration m011 backfilled them from the
rows already logged. The windowed read is core/store/score_reads.py.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterable, Sequence
from typing import Any

from core.store.rollups import Tier, additive_upsert_sql

STEPS_PER_OCTAVE = 32
SCORE_EDGES: list[float] = [0.0] + [2 ** (k / STEPS_PER_OCTAVE)
                                    for k in range(-14 * STEPS_PER_OCTAVE, 14 * STEPS_PER_OCTAVE + 1)]
SCORE_BUCKETS = len(SCORE_EDGES) + 1
COUNTERS = ["requests", "comparisons", "agreements"]

MINUTE = Tier("score_rollups", "minute", 60)
HOUR = Tier("score_rollups_hourly", "hour", 3600)
DAY = Tier("score_rollups_daily", "day", 86400)
TIERS = (MINUTE, HOUR, DAY)


def key_columns(tier: Tier) -> list[str]:
    return [tier.key, "route", "bucket"]


def columns(tier: Tier) -> dict[str, type]:
    return {tier.key: int, "route": str, "bucket": int, **dict.fromkeys(COUNTERS, int)}


def bucket_of(score: float) -> int:
    """The bucket holding ``score``: SCORE_EDGES[i-1] < score <= SCORE_EDGES[i]."""
    return bisect.bisect_left(SCORE_EDGES, score)


def snap(threshold: float) -> int:
    """The last bucket wholly at or under ``threshold``: scores <= SCORE_EDGES[snap(t)] are
    the ones counted for ``t`` (-1: none, for a negative threshold)."""
    return bisect.bisect_right(SCORE_EDGES, threshold) - 1


Contribution = tuple[float, str | None, float | None, int, int, int]  # time, route, score, counters


def _requests(rows: Iterable[dict[str, Any]], sign: int) -> Iterable[Contribution]:
    for row in rows:
        yield row["created_at"], row.get("route"), row.get("router_score"), sign, 0, 0


def _shadow(rows: Iterable[dict[str, Any]]) -> Iterable[Contribution]:
    for row in rows:
        yield row["created_at"], row.get("route"), row.get("router_score"), 0, 1, int(row.get("agree") or 0)


def _deltas(contributions: Iterable[Contribution]) -> dict[Tier, list[list[Any]]]:
    minutes: dict[tuple[int, str, int], list[int]] = {}
    for created_at, route, score, *counts in contributions:
        if score is None or route is None or score != score:  # the raw reads skip them (SQLite stores NaN as NULL)
            continue
        total = minutes.setdefault((int(created_at // 60), route, bucket_of(score)), [0, 0, 0])
        for index, count in enumerate(counts):
            total[index] += count
    result: dict[Tier, list[list[Any]]] = {}
    for tier in TIERS:
        coarse: dict[tuple[int, str, int], list[int]] = {}
        for (minute, route, bucket), counts in minutes.items():
            total = coarse.setdefault((minute * 60 // tier.seconds, route, bucket), [0, 0, 0])
            for index, count in enumerate(counts):
                total[index] += count
        result[tier] = [[*key, *counts] for key, counts in coarse.items() if any(counts)]
    return result


def request_deltas(old_rows: Sequence[dict[str, Any]], new_rows: Sequence[dict[str, Any]]) -> dict[Tier, list[list[Any]]]:
    """What writing ``new_rows`` to the request log changes, as upsert parameters per tier; the
    rows they replace (a spool replay, same id) take their own contribution back first."""
    return _deltas([*_requests(old_rows, -1), *_requests(new_rows, 1)])


def shadow_deltas(rows: Sequence[dict[str, Any]]) -> dict[Tier, list[list[Any]]]:
    """What appending ``rows`` to the shadow log changes (shadow rows are never replaced)."""
    return _deltas(_shadow(rows))


@functools.cache
def upsert_sql(tier: Tier) -> str:
    return additive_upsert_sql(tier.table, key_columns(tier), list(COUNTERS))


def write(executemany: Any, deltas: dict[Tier, list[list[Any]]], translate: Any = str) -> None:
    """Apply ``deltas`` through a cursor's ``executemany`` (``translate``: the dialect's placeholders)."""
    for tier, params in deltas.items():
        if params:
            executemany(translate(upsert_sql(tier)), params)


# Backfill (migration m011): the logged rows, a page at a time in key order.
_BACKFILL_PAGE = 50_000
_BACKFILL_SOURCES = {
    "requests": "select id, created_at, route, router_score from requests",
    "shadow_results": "select id, created_at, route, router_score, agree from shadow_results",
}


def backfill(execute: Any, placeholder: str) -> None:
    """Fill every tier from the request and shadow logs. The bucket is ``bucket_of``'s, the
    same Python the writer runs, so a backfilled row and a written one can never disagree."""
    for table, select in _BACKFILL_SOURCES.items():
        after: Any = None
        while True:
            where = "router_score is not null" + ("" if after is None else f" and id > {placeholder}")
            rows = execute(f"{select} where {where} order by id limit {_BACKFILL_PAGE}", [] if after is None else [after])
            if not rows:
                break
            dicts = [dict(zip(("id", "created_at", "route", "router_score", "agree"), row, strict=False)) for row in rows]
            for tier, params in (request_deltas([], dicts) if table == "requests" else shadow_deltas(dicts)).items():
                sql = upsert_sql(tier).replace("?", placeholder)
                for entry in params:
                    execute(sql, entry)
            after = rows[-1][0]
