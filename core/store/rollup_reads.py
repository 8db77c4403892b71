"""Reading a time window from the rollup tiers (core/store/rollups.py): the window
``created_at >= start`` is cut into whole days (daily tier), the whole hours before the first of
them (hourly tier), the whole minutes before the first of those (minute tier) and the
part-minute at the start (raw request rows), so a summary reads at most ~24 + 60 + days rollup
rows per key and is the raw query's figure exactly. Latency percentiles come from the tiers'
histograms, within the bucket error stated in ``percentile``.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Protocol

from core.store.rollups import BUCKET_COLUMNS, LATENCY_EDGES_MS, TIERS, Tier, bucket_of


class _Queryable(Protocol):
    def query(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> list[dict[str, Any]]: ...


_COUNTERS = ("requests, errors, student_requests, fallbacks, prompt_tokens, completion_tokens, cost_usd, "
             "teacher_cost_usd")
_RAW_COUNTERS = """1, case when status_code >= 400 then 1 else 0 end, case when target = 'student' then 1 else 0 end,
         coalesce(fallback, 0), coalesce(prompt_tokens, 0), coalesce(completion_tokens, 0), coalesce(cost_usd, 0.0),
         coalesce(teacher_cost_usd, 0.0)"""


def tier_bounds(start: float, tiers: tuple[Tier, ...] = TIERS) -> list[int]:
    """The first whole minute at or after ``start``, the first whole hour at or after that, ...
    each in its own tier's unit."""
    bounds = [math.ceil(start / tiers[0].seconds)]
    for finer, coarser in itertools.pairwise(tiers):
        bounds.append(math.ceil(bounds[-1] * finer.seconds / coarser.seconds))
    return bounds


def window_sql(tier_columns: str, raw_columns: str | None = None, where: str = "",
               tiers: tuple[Tier, ...] = TIERS) -> str:
    """A union of the rows covering ``created_at >= start``: each tier from its bound to the
    next coarser tier's, the coarsest to the end, then (with ``raw_columns``) the raw rows of
    the part-minute at the start. ``{time}`` in the columns is the part's time in seconds;
    ``where`` (``and ...``) filters every part. Params: ``window_params``, then each part's
    ``where`` params after its own (``window_params`` interleaves them)."""
    parts = []
    for index, tier in enumerate(tiers):
        upper = f" and {tier.key} < ?" if index + 1 < len(tiers) else ""
        # In floating point: an INTEGER product would overflow PostgreSQL's 32 bits in 2038.
        columns = tier_columns.format(time=f"{tier.key} * {float(tier.seconds)!r}")
        parts.append(f"select {columns} from {tier.table} where {tier.key} >= ?{upper} {where}")
    if raw_columns is not None:
        parts.append(f"select {raw_columns.format(time='created_at')} from requests "
                     f"where created_at >= ? and created_at < ? {where}")
    return "\n  union all\n  ".join(parts)


def window_params(start: float, where_params: list[Any] | None = None, raw: bool = True,
                  tiers: tuple[Tier, ...] = TIERS) -> list[Any]:
    bounds, extra, result = tier_bounds(start, tiers), where_params or [], []
    for index, tier in enumerate(tiers):
        result.append(bounds[index])
        if index + 1 < len(tiers):
            result.append(bounds[index + 1] * tiers[index + 1].seconds // tier.seconds)
        result += extra
    if raw:
        result += [start, bounds[0] * tiers[0].seconds * 1.0, *extra]
    return result


_SUMS = """
       sum(requests) as requests, sum(errors) as errors, sum(student_requests) as student_requests,"""


def _window_rows(tiers: tuple[Tier, ...]) -> str:
    return "select route, client_key_id, " + _COUNTERS + " from (" + window_sql(
        "route, client_key_id, " + _COUNTERS, "route, coalesce(client_key_id, ''), " + _RAW_COUNTERS,
        tiers=tiers) + ") window_rows"


def summary_sql(tiers: tuple[Tier, ...] = TIERS) -> str:
    """Per route over a window (params: ``window_params(start, tiers=tiers)``)."""
    return "select route," + _SUMS + """
       sum(fallbacks) as fallbacks, cast(sum(prompt_tokens) as bigint) as prompt_tokens,
       cast(sum(completion_tokens) as bigint) as completion_tokens,
       sum(cost_usd) as cost_usd, sum(teacher_cost_usd) as teacher_cost_usd
from (""" + _window_rows(tiers) + ") summed group by route"


def key_summary_sql(tiers: tuple[Tier, ...] = TIERS) -> str:
    """Per client key over a window, the costliest first (params as ``summary_sql``)."""
    return "select nullif(client_key_id, '') as client_key_id," + _SUMS + """
       sum(cost_usd) as cost_usd, sum(teacher_cost_usd) as teacher_cost_usd
from (""" + _window_rows(tiers) + """) summed group by nullif(client_key_id, '')
order by cost_usd desc, client_key_id"""


SUMMARY_SQL = summary_sql()
KEY_SUMMARY_SQL = key_summary_sql()
HISTOGRAM_SQL = ("select route, target, " + ", ".join(f"sum({c}) as {c}" for c in BUCKET_COLUMNS)
                 + " from (" + window_sql("route, target, " + ", ".join(BUCKET_COLUMNS))
                 + ") window_rows group by route, target")
_EDGE_LATENCY_SQL = """
select route, coalesce(target, '') as target, latency_ms from requests
where created_at >= ? and created_at < ? and latency_ms is not null
"""


def cost_series_tiers(width_s: int) -> tuple[Tier, ...]:
    """The tiers whose rows each fall in one ``width_s`` bucket: those whose width divides it."""
    return tuple(tier for tier in TIERS if width_s % tier.seconds == 0)


def cost_series_sql(tiers: tuple[Tier, ...], floor_div: str) -> str:
    """Per bucket (``floor_div``: the dialect's ``t`` divided by ``?``, times the width) for one route:
    requests, student requests, cost and all-teacher cost. Params: width, width, then
    ``window_params(start, [route], tiers=tiers)``."""
    rows = window_sql("{time} as t, requests, student_requests, cost_usd, teacher_cost_usd",
                      "{time} as t, 1, case when target = 'student' then 1 else 0 end, coalesce(cost_usd, 0.0), "
                      "coalesce(teacher_cost_usd, 0.0)", "and route = ?", tiers)
    return f"""select {floor_div} * ? as bucket, sum(requests) as requests,
       sum(student_requests) as student_requests, sum(cost_usd) as cost_usd, sum(teacher_cost_usd) as teacher_cost_usd
from ({rows}) window_rows group by bucket order by bucket"""


def percentile(counts: list[int], quantile: float) -> float | None:
    """The nearest-rank ``quantile`` read from a histogram over ``LATENCY_EDGES_MS``: the
    geometric middle of the bucket holding that rank, so within 2**(1/8) (-8.3 % .. +9.1 %) of
    the exact value; below 1 ms it reads 1 ms, at or above 2**18 ms it reads 2**18 ms."""
    total = sum(counts)
    if not total:
        return None
    rank, seen = max(0, min(total - 1, math.ceil(quantile * total) - 1)), 0
    for index, count in enumerate(counts):
        seen += count
        if seen > rank:
            if index == 0:
                return LATENCY_EDGES_MS[0]
            if index == len(LATENCY_EDGES_MS):
                return LATENCY_EDGES_MS[-1]
            return math.sqrt(LATENCY_EDGES_MS[index - 1] * LATENCY_EDGES_MS[index])
    return None  # unreachable: the ranks are within total


def latency_histograms(store: _Queryable, start: float) -> dict[str, dict[str, list[int]]]:
    """route -> target ("none" for no target, "all" for every request) -> bucket counts."""
    result: dict[str, dict[str, list[int]]] = {}

    def add(route: str, target: str, counts: list[int]) -> None:
        by_target = result.setdefault(route, {})
        for name in (target or "none", "all"):
            total = by_target.setdefault(name, [0] * len(BUCKET_COLUMNS))
            for index, count in enumerate(counts):
                total[index] += count

    for row in store.query(HISTOGRAM_SQL, window_params(start, raw=False)):
        add(row["route"], row["target"], [int(row[c] or 0) for c in BUCKET_COLUMNS])
    for row in store.query(_EDGE_LATENCY_SQL, [start, tier_bounds(start)[0] * 60.0]):
        counts = [0] * len(BUCKET_COLUMNS)
        counts[bucket_of(row["latency_ms"])] = 1
        add(row["route"], row["target"], counts)
    return {route: {target: counts for target, counts in by_target.items() if any(counts)}
            for route, by_target in result.items()}


def latency_quantiles(store: _Queryable, start: float) -> dict[str, dict[str, dict[str, float | None]]]:
    """route -> target -> {"p50": ms, "p99": ms}, from the histograms."""
    return {route: {target: {"p50": percentile(counts, 0.5), "p99": percentile(counts, 0.99)}
                    for target, counts in by_target.items()}
            for route, by_target in latency_histograms(store, start).items() if by_target}
