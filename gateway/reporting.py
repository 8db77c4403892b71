"""Reporting queries over the store, shared by the dashboard, ``distillgate report`` and the
metrics collectors. Every reporting SQL string lives in this module.

All figures are computed from the request log and the shadow results: ``cost_usd`` is what
a request actually cost, ``teacher_cost_usd`` what the same request would have cost on the
teacher (the all-teacher counterfactual), so savings = all-teacher cost - actual cost.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


class Queryable(Protocol):
    def query(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> list[dict[str, Any]]: ...


_SUMMARY_SQL = """
select route,
       count(*) as requests,
       coalesce(sum(status_code >= 400), 0) as errors,
       coalesce(sum(target = 'student'), 0) as student_requests,
       coalesce(sum(fallback), 0) as fallbacks,
       coalesce(sum(prompt_tokens), 0) as prompt_tokens,
       coalesce(sum(completion_tokens), 0) as completion_tokens,
       coalesce(sum(cost_usd), 0.0) as cost_usd,
       coalesce(sum(teacher_cost_usd), 0.0) as teacher_cost_usd
from requests where created_at >= ? group by route
"""
_SHADOW_SQL = """
select route, count(*) as comparisons, coalesce(sum(agree), 0) as agreements
from shadow_results where created_at >= ? group by route
"""
_LATENCY_GROUPS_SQL = """
select route, coalesce(target, 'none') as target, count(*) as n
from requests where created_at >= ? and latency_ms is not null group by route, coalesce(target, 'none')
union all
select route, 'all' as target, count(*) as n
from requests where created_at >= ? and latency_ms is not null group by route
"""
# The n-th smallest latency, by rank: SQLite has no percentile function, and sorting in the
# database keeps a large window out of Python's memory.
_LATENCY_RANK_SQL = """
select latency_ms from requests
where route = ? and (? = 'all' or coalesce(target, 'none') = ?) and created_at >= ? and latency_ms is not null
order by latency_ms limit 1 offset ?
"""
_COST_SERIES_SQL = """
select cast(created_at / ? as integer) * ? as bucket,
       count(*) as requests,
       coalesce(sum(target = 'student'), 0) as student_requests,
       coalesce(sum(cost_usd), 0.0) as cost_usd,
       coalesce(sum(teacher_cost_usd), 0.0) as teacher_cost_usd
from requests where route = ? and created_at >= ? group by bucket order by bucket
"""
_FIRST_REQUEST_SQL = "select min(created_at) as first from requests where route = ? and created_at >= ?"
_REQUEST_SCORES_SQL = """
select router_score from requests where route = ? and created_at >= ? and router_score is not null
"""
_SHADOW_SCORES_SQL = """
select router_score, agree from shadow_results
where route = ? and created_at >= ? and router_score is not null
"""
_SHADOW_TALLY_SQL = """
select route, coalesce(student_version, 'none') as student_version, count(*) as comparisons,
       coalesce(sum(agree), 0) as agreements, max(id) as last_id
from shadow_results where id > ? group by route, coalesce(student_version, 'none')
"""
_TRAINING_TALLY_SQL = """
select route, coalesce(outcome, 'unknown') as outcome, count(*) as runs, max(finished_at) as last_finished
from training_runs group by route, coalesce(outcome, 'unknown')
"""
_ROUTES_SQL = "select distinct route from requests union select distinct route from student_versions"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str | None) -> float | None:
    """``"24h"``, ``"30m"``, ``"7d"`` -> seconds; ``None``/``"all"`` -> None (no limit).
    Raises ValueError on anything else."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    match = _DURATION.match(text.lower())
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30m, 24h, 7d or all)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def window_start(since_s: float | None, now: float | None = None) -> float:
    return 0.0 if since_s is None else (now or time.time()) - since_s


@dataclass
class RouteSummary:
    route: str
    requests: int = 0
    errors: int = 0
    student_requests: int = 0
    fallbacks: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    teacher_cost_usd: float = 0.0
    shadow_comparisons: int = 0
    shadow_agreements: int = 0
    latency_ms: dict[str, dict[str, float | None]] = field(default_factory=dict)  # target -> p50/p99
    live_version: str | None = None

    @property
    def savings_usd(self) -> float:
        return self.teacher_cost_usd - self.cost_usd

    @property
    def student_share(self) -> float | None:
        return self.student_requests / self.requests if self.requests else None

    @property
    def agreement(self) -> float | None:
        return self.shadow_agreements / self.shadow_comparisons if self.shadow_comparisons else None

    def latency(self, quantile: str, target: str = "all") -> float | None:
        return self.latency_ms.get(target, {}).get(quantile)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(savings_usd=self.savings_usd, student_share=self.student_share, agreement=self.agreement)
        return data


def _rank(n: int, quantile: float) -> int:
    """Nearest-rank percentile: the 0-based index of the q-quantile among n sorted values."""
    return max(0, min(n - 1, math.ceil(quantile * n) - 1))


def _latency_quantiles(store: Queryable, start: float) -> dict[str, dict[str, dict[str, float | None]]]:
    """route -> target -> {"p50": ms, "p99": ms}; target "all" covers every request."""
    result: dict[str, dict[str, dict[str, float | None]]] = {}
    for group in store.query(_LATENCY_GROUPS_SQL, [start, start]):
        quantiles = {}
        for name, quantile in (("p50", 0.5), ("p99", 0.99)):
            target = group["target"]
            rows = store.query(_LATENCY_RANK_SQL, [group["route"], target, target, start,
                                                   _rank(group["n"], quantile)])
            quantiles[name] = rows[0]["latency_ms"] if rows else None
        result.setdefault(group["route"], {})[group["target"]] = quantiles
    return result


def route_summaries(store: Queryable, routes: list[str], since_s: float | None = None) -> list[RouteSummary]:
    """One summary per route: the given routes first (even without traffic), then any other
    route found in the store."""
    start = window_start(since_s)
    summaries = {route: RouteSummary(route) for route in routes}
    for row in store.query(_SUMMARY_SQL, [start]):
        summary = summaries.setdefault(row["route"], RouteSummary(row["route"]))
        for key, value in row.items():
            if key != "route":
                setattr(summary, key, value)
    for row in store.query(_SHADOW_SQL, [start]):
        summary = summaries.setdefault(row["route"], RouteSummary(row["route"]))
        summary.shadow_comparisons, summary.shadow_agreements = row["comparisons"], row["agreements"]
    for route, by_target in _latency_quantiles(store, start).items():
        summaries.setdefault(route, RouteSummary(route)).latency_ms = by_target
    return list(summaries.values())


def known_routes(store: Queryable) -> list[str]:
    return sorted(row["route"] for row in store.query(_ROUTES_SQL) if row["route"])


def _bucket_seconds(span_s: float, buckets: int = 60) -> int:
    """A round bucket width giving about ``buckets`` points over the span."""
    for width in (60, 300, 900, 3600, 3 * 3600, 6 * 3600, 86400, 7 * 86400):
        if span_s / width <= buckets:
            return width
    return 30 * 86400


def cost_series(store: Queryable, route: str, since_s: float | None = None,
                now: float | None = None) -> list[dict[str, Any]]:
    """Per time bucket: requests, student requests, cost and all-teacher cost, plus their
    running totals (``cumulative_cost_usd``, ``cumulative_teacher_cost_usd``)."""
    now = now or time.time()
    start = window_start(since_s, now)
    first = store.query(_FIRST_REQUEST_SQL, [route, start])[0]["first"]
    if first is None:
        return []
    width = _bucket_seconds(now - max(start, first))
    points, cost, teacher_cost = [], 0.0, 0.0
    for row in store.query(_COST_SERIES_SQL, [width, width, route, start]):
        cost += row["cost_usd"]
        teacher_cost += row["teacher_cost_usd"]
        points.append({**row, "bucket_s": width, "cumulative_cost_usd": cost,
                       "cumulative_teacher_cost_usd": teacher_cost})
    return points


@dataclass
class CalibrationPoint:
    threshold: float
    student_share: float  # share of logged requests whose OOD score is at or under the threshold
    expected_agreement: float | None  # shadow agreement among scored comparisons under it
    shadow_samples: int


def calibration_curve(request_scores: list[float], shadow: list[tuple[float, int]],
                      thresholds: list[float]) -> list[CalibrationPoint]:
    """Sweep thresholds: the student serves a request when its OOD score <= threshold, so
    student share is the fraction of scores under it and the expected agreement is the mean
    shadow agreement of the comparisons under it."""
    request_scores = sorted(request_scores)
    shadow = sorted(shadow)
    points = []
    for threshold in thresholds:
        under = sum(1 for score in request_scores if score <= threshold)
        agreed = [agree for score, agree in shadow if score <= threshold]
        points.append(CalibrationPoint(
            threshold=threshold,
            student_share=under / len(request_scores) if request_scores else 0.0,
            expected_agreement=sum(agreed) / len(agreed) if agreed else None,
            shadow_samples=len(agreed),
        ))
    return points


def threshold_range(request_scores: list[float], current: float) -> float:
    """The slider's upper end: past every logged score and the current threshold."""
    top = max([*request_scores, current, 0.0])
    return round(max(1.0, top * 1.1), 3)


def route_calibration(store: Queryable, route: str, current: float, since_s: float | None = None,
                      steps: int = 50, target_agreement: float = 0.97, confidence: float = 0.95) -> dict[str, Any]:
    """The calibration curve for the dashboard's threshold control: student share over every
    scored request, expected agreement over the shadow comparisons, and, from
    ``router.calibration``, the agreement lower bound and the certified recommended threshold
    (same defaults as ``distillgate calibrate``)."""
    start = window_start(since_s)
    scores = [row["router_score"] for row in store.query(_REQUEST_SCORES_SQL, [route, start])]
    shadow = [(row["router_score"], int(row["agree"] or 0)) for row in store.query(_SHADOW_SCORES_SQL, [route, start])]
    top = threshold_range(scores, current)
    thresholds = [round(top * step / steps, 6) for step in range(steps + 1)]
    points = [asdict(point) for point in calibration_curve(scores, shadow, thresholds)]
    result = {"max": top, "step": round(top / steps, 6), "scored_requests": len(scores),
              "shadow_samples": len(shadow), "points": points, "recommended_threshold": None,
              "target_agreement": target_agreement, "confidence": confidence, "note": ""}
    if shadow:
        result.update(_certified(shadow, points, target_agreement, confidence))
    return result


def _certified(shadow: list[tuple[float, int]], points: list[dict[str, Any]], target_agreement: float,
               confidence: float) -> dict[str, Any]:
    """The router's certified calibration (a lower confidence bound on agreement and the
    recommended threshold) laid over the dashboard's sweep; nothing when it is unavailable."""
    try:
        from router.calibration import calibrate
    except ImportError:  # the router package without its numeric extras: the plain sweep stands
        return {}
    result = calibrate(shadow, target_agreement=target_agreement, confidence=confidence)
    curve = sorted(result.curve, key=lambda point: point.threshold)
    for point in points:
        under = [entry for entry in curve if entry.threshold <= point["threshold"]]
        point["agreement_lcb"] = under[-1].agreement_lcb if under else None
    return {"recommended_threshold": result.recommended_threshold, "note": result.note}


def shadow_tally_since(store: Queryable, last_id: int) -> list[dict[str, Any]]:
    """Shadow comparisons and agreements per route and student version with ``id > last_id``
    (the metrics collector keeps running totals and reads only new rows)."""
    return store.query(_SHADOW_TALLY_SQL, [last_id])


def training_tally(store: Queryable) -> list[dict[str, Any]]:
    """Training runs per route and outcome, with the last finish time."""
    return store.query(_TRAINING_TALLY_SQL)
