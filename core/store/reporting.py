"""Reporting queries over the store, shared by the dashboard, ``distillgate report`` and the
metrics collectors. Every reporting SQL string lives in this module (the windowed reads of
the rollup tiers in core/store/rollup_reads.py), written once in the SQL
that SQLite and PostgreSQL both accept (``?`` placeholders; the one expression they write
differently comes from the store's dialect).

All figures are computed from the request log (through its rollups, for the request counts,
costs, latencies and cost series) and the shadow results: ``cost_usd`` is what
a request actually cost, ``teacher_cost_usd`` what the same request would have cost on the
teacher (the all-teacher counterfactual), so savings = all-teacher cost - actual cost.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from core.config import CostsConfig
from core.store import rollup_reads, shadow_rollups
from core.store.dialect import Dialect


class Queryable(Protocol):
    dialect: Dialect

    def query(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> list[dict[str, Any]]: ...


# The counts every summary starts with, by route or by client key.
_REQUEST_COUNTS = """
       count(*) as requests,
       coalesce(sum(case when status_code >= 400 then 1 else 0 end), 0) as errors,
       coalesce(sum(case when target = 'student' then 1 else 0 end), 0) as student_requests,"""
_SUMMARY_SQL = """
select route,""" + _REQUEST_COUNTS + """
       coalesce(sum(fallback), 0) as fallbacks,
       coalesce(sum(prompt_tokens), 0) as prompt_tokens,
       coalesce(sum(completion_tokens), 0) as completion_tokens,
       coalesce(sum(cost_usd), 0.0) as cost_usd,
       coalesce(sum(teacher_cost_usd), 0.0) as teacher_cost_usd
from requests where created_at >= ? group by route
"""
# Summaries read rollup_reads.SUMMARY_SQL / KEY_SUMMARY_SQL instead: equal to the raw queries
# (tests/test_rollups.py), which stay as the reference and for the benchmark's "before".
_SHADOW_SQL = """
select route, count(*) as comparisons, coalesce(sum(agree), 0) as agreements,
       coalesce(sum(case when served_by = 'student' then 1 else 0 end), 0) as served_comparisons,
       coalesce(sum(case when served_by = 'student' then agree else 0 end), 0) as served_agreements,
       coalesce(sum(cost_usd), 0.0) as shadow_cost_usd
from shadow_results where created_at >= ? group by route
"""
# Feedback rows (POST /v1/feedback) on answers the student served: how many, how many rated,
# how many rated down. Rows, not requests: a request rated twice counts twice.
_STUDENT_FEEDBACK_SQL = """
select route, count(*) as student_feedback,
       coalesce(sum(case when rating is not null then 1 else 0 end), 0) as student_ratings,
       coalesce(sum(case when rating = 'down' then 1 else 0 end), 0) as student_thumbs_down
from feedback where created_at >= ? and target = 'student' group by route
"""
_TRAINING_RUNS_SQL = """
select route, started_at, finished_at, outcome, version, detail_json from training_runs
where started_at >= ? order by started_at
"""
_SHADOW_COSTS_SQL = "select created_at, coalesce(cost_usd, 0.0) as cost_usd from shadow_results order by created_at"
# ``{bucket}``: the time bucket's number, written per dialect (core/store/dialect.py).
_COST_SERIES_SQL = """
select {bucket} * ? as bucket,
       count(*) as requests,
       coalesce(sum(case when target = 'student' then 1 else 0 end), 0) as student_requests,
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
# Per client key (null: requests without a key, an open gateway's).
_KEY_SUMMARY_SQL = """
select client_key_id,""" + _REQUEST_COUNTS + """
       coalesce(sum(cost_usd), 0.0) as cost_usd,
       coalesce(sum(teacher_cost_usd), 0.0) as teacher_cost_usd
from requests where created_at >= ? group by client_key_id order by cost_usd desc, client_key_id
"""
_KEY_SPEND_SQL = """
select client_key_id, coalesce(sum(cost_usd), 0.0) as cost_usd
from requests where created_at >= ? and client_key_id is not null group by client_key_id
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
    # Of those, the comparisons of answers the student served (past the cascade): what clients got.
    served_comparisons: int = 0
    served_agreements: int = 0
    shadow_cost_usd: float = 0.0
    training_runs: int = 0
    training_hours: float = 0.0
    training_cost_usd: float = 0.0
    latency_ms: dict[str, dict[str, float | None]] = field(default_factory=dict)  # target -> p50/p99
    live_version: str | None = None
    student_feedback: int = 0
    student_ratings: int = 0
    student_thumbs_down: int = 0

    @property
    def savings_usd(self) -> float:
        return self.teacher_cost_usd - self.cost_usd

    @property
    def net_savings_usd(self) -> float:
        """Savings after what the loop itself cost: shadow calls to the teacher and training."""
        return self.savings_usd - self.shadow_cost_usd - self.training_cost_usd

    @property
    def student_share(self) -> float | None:
        return self.student_requests / self.requests if self.requests else None

    @property
    def agreement(self) -> float | None:
        return self.shadow_agreements / self.shadow_comparisons if self.shadow_comparisons else None

    @property
    def served_agreement(self) -> float | None:
        """Agreement with the teacher of the answers the student served; ``agreement`` also
        counts the student's answers to requests the teacher served (unchecked by the cascade)."""
        return self.served_agreements / self.served_comparisons if self.served_comparisons else None

    @property
    def student_thumbs_down_share(self) -> float | None:
        """Of the ratings given to student answers, the share that was thumbs down."""
        return self.student_thumbs_down / self.student_ratings if self.student_ratings else None

    def latency(self, quantile: str, target: str = "all") -> float | None:
        return self.latency_ms.get(target, {}).get(quantile)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(savings_usd=self.savings_usd, net_savings_usd=self.net_savings_usd,
                    student_share=self.student_share, agreement=self.agreement,
                    served_agreement=self.served_agreement, student_thumbs_down_share=self.student_thumbs_down_share)
        return data


def route_summaries(store: Queryable, routes: list[str], since_s: float | None = None,
                    costs: CostsConfig | None = None) -> list[RouteSummary]:
    """One summary per route: the given routes first (even without traffic), then any other
    route found in the store. Training runs are priced with ``costs`` (default prices when None)."""
    start = window_start(since_s)
    summaries = {route: RouteSummary(route) for route in routes}
    for row in store.query(rollup_reads.SUMMARY_SQL, rollup_reads.window_params(start)):
        summary = summaries.setdefault(row["route"], RouteSummary(row["route"]))
        for key, value in row.items():
            if key != "route":
                setattr(summary, key, value)
    for row in shadow_rollups.summary(store, start):  # _SHADOW_SQL, from the rollups
        summary = summaries.setdefault(row["route"], RouteSummary(row["route"]))
        summary.shadow_comparisons, summary.shadow_agreements = row["comparisons"], row["agreements"]
        summary.served_comparisons, summary.served_agreements = row["served_comparisons"], row["served_agreements"]
        summary.shadow_cost_usd = float(row["shadow_cost_usd"])
    for run in training_compute(store, since_s):
        summary = summaries.setdefault(run["route"], RouteSummary(run["route"]))
        summary.training_runs += 1
        summary.training_hours += run["seconds"] / 3600
        summary.training_cost_usd += (costs or CostsConfig()).training_cost(run["seconds"], run["device"])
    for row in store.query(_STUDENT_FEEDBACK_SQL, [start]):
        summary = summaries.setdefault(row["route"], RouteSummary(row["route"]))
        summary.student_feedback, summary.student_ratings = row["student_feedback"], row["student_ratings"]
        summary.student_thumbs_down = row["student_thumbs_down"]
    for route, by_target in rollup_reads.latency_quantiles(store, start).items():
        summaries.setdefault(route, RouteSummary(route)).latency_ms = by_target
    return list(summaries.values())


NO_KEY = "(no key)"


@dataclass
class KeySummary:
    """One client key's traffic: ``client_key_id`` is the key's short hash (never the key),
    None for requests sent without a key. ``name`` and the budget figures are the caller's
    to fill from the config: the store knows only the hash."""

    client_key_id: str | None
    requests: int = 0
    errors: int = 0
    student_requests: int = 0
    cost_usd: float = 0.0
    teacher_cost_usd: float = 0.0
    name: str | None = None
    monthly_budget_usd: float | None = None
    month_spend_usd: float | None = None

    @property
    def label(self) -> str:
        if self.client_key_id is None:
            return NO_KEY
        return f"{self.name} ({self.client_key_id})" if self.name else self.client_key_id

    @property
    def savings_usd(self) -> float:
        return self.teacher_cost_usd - self.cost_usd

    @property
    def student_share(self) -> float | None:
        return self.student_requests / self.requests if self.requests else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(label=self.label, savings_usd=self.savings_usd, student_share=self.student_share)
        return data


def key_summaries(store: Queryable, since_s: float | None = None) -> list[KeySummary]:
    """One summary per client key seen in the window (requests without a key as one), the
    costliest first."""
    rows = store.query(rollup_reads.KEY_SUMMARY_SQL, rollup_reads.window_params(window_start(since_s)))
    return [KeySummary(**row) for row in rows]


def month_start_utc(now: float | None = None) -> float:
    """The first instant of the current calendar month, UTC, as a Unix time."""
    today = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.UTC)
    return today.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


def month_spend_by_key(store: Queryable, now: float | None = None) -> dict[str, float]:
    """Each client key's spend (sum of its requests' ``cost_usd``) this calendar month, UTC."""
    rows = store.query(rollup_reads.KEY_SUMMARY_SQL, rollup_reads.window_params(month_start_utc(now)))
    return {row["client_key_id"]: float(row["cost_usd"]) for row in rows if row["client_key_id"] is not None}


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
    # From the rollup tiers whose rows each fall in one bucket (_COST_SERIES_SQL is the raw reference).
    tiers = rollup_reads.cost_series_tiers(width)
    query = rollup_reads.cost_series_sql(tiers, store.dialect.floor_div("t", "?"))
    for row in store.query(query, [width, width, *rollup_reads.window_params(start, [route], tiers=tiers)]):
        cost += row["cost_usd"]
        teacher_cost += row["teacher_cost_usd"]
        points.append({**row, "bucket_s": width, "cumulative_cost_usd": cost,
                       "cumulative_teacher_cost_usd": teacher_cost})
    return points


def calibration_scores(store: Queryable, route: str, since_s: float | None = None
                       ) -> tuple[list[float], list[tuple[float, int]]]:
    """The route's logged OOD scores, and its shadow comparisons as (score, agreed)."""
    start = window_start(since_s)
    scores = [row["router_score"] for row in store.query(_REQUEST_SCORES_SQL, [route, start])]
    shadow = [(row["router_score"], int(row["agree"] or 0)) for row in store.query(_SHADOW_SCORES_SQL, [route, start])]
    return scores, shadow


def shadow_tally_since(store: Queryable, last_id: int) -> list[dict[str, Any]]:
    """Shadow comparisons and agreements per route and student version with ``id > last_id``
    (the metrics collector keeps running totals and reads only new rows)."""
    return store.query(_SHADOW_TALLY_SQL, [last_id])


def training_tally(store: Queryable) -> list[dict[str, Any]]:
    """Training runs per route and outcome, with the last finish time."""
    return store.query(_TRAINING_TALLY_SQL)


def total_costs(store: Queryable) -> tuple[float, float]:
    """(actual cost, all-teacher cost) over every logged request."""
    row = store.query("select coalesce(sum(cost_usd), 0.0) as cost, coalesce(sum(teacher_cost_usd), 0.0) as teacher "
                      "from requests")[0]
    return float(row["cost"]), float(row["teacher"])


def average_costs(store: Queryable, route: str) -> tuple[float | None, float | None]:
    """Average all-teacher cost per successful request, and average cost of a student-served one."""
    rows = store.query(
        "select avg(teacher_cost_usd) as teacher, avg(case when target = 'student' then cost_usd end) as student "
        "from requests where route = ? and status_code = 200", [route])
    return (rows[0]["teacher"], rows[0]["student"]) if rows else (None, None)


def request_costs(store: Queryable) -> dict[str, float]:
    """Each logged request's cost, by request id."""
    return {row["id"]: row["cost_usd"] for row in store.query("select id, cost_usd from requests")}


def status_counts(store: Queryable) -> dict[str, int]:
    """Logged requests per HTTP status (as text)."""
    return {str(row["status_code"]): int(row["n"])
            for row in store.query("select status_code, count(*) as n from requests group by status_code")}


def loop_tally(store: Queryable) -> dict[str, Any]:
    """The training loop's counts: shadow spend, training runs, promotions, and every version."""
    shadow = store.query("select coalesce(sum(cost_usd), 0.0) as cost, count(*) as n from shadow_results")[0]
    runs = store.query("select count(*) as n from training_runs")[0]["n"]
    swaps = store.query("select count(*) as n from student_versions where promoted_at is not null")[0]["n"]
    versions = store.query("select route, version, status, note, metrics_json, train_examples, created_at, promoted_at "
                           "from student_versions order by created_at")
    return {"shadow_cost_usd": float(shadow["cost"]), "shadow_requests": int(shadow["n"]),
            "retrains": int(runs), "swaps": int(swaps), "versions": versions}


def _run_device(detail_json: str | None) -> str:
    """The device a training run used, as the trainer recorded it; CPU when it did not say."""
    try:
        detail = json.loads(detail_json or "{}")
    except ValueError:
        return "cpu"
    train = detail.get("train") if isinstance(detail, dict) else None
    device = (train or {}).get("device") if isinstance(train, dict) else None
    return str(device or (detail.get("device") if isinstance(detail, dict) else None) or "cpu")


def training_compute(store: Queryable, since_s: float | None = None) -> list[dict[str, Any]]:
    """Every finished training run started in the window: route, started_at, finished_at,
    outcome, version, ``seconds`` (its wall time) and ``device``. A run counts whatever its
    outcome: a rejected candidate cost as much compute as a promoted one."""
    runs = []
    for row in store.query(_TRAINING_RUNS_SQL, [window_start(since_s)]):
        if row["started_at"] is None or row["finished_at"] is None:
            continue
        runs.append({"route": row["route"], "started_at": row["started_at"], "finished_at": row["finished_at"],
                     "outcome": row["outcome"], "version": row["version"],
                     "seconds": max(0.0, row["finished_at"] - row["started_at"]),
                     "device": _run_device(row["detail_json"])})
    return runs


def shadow_costs(store: Queryable) -> list[tuple[float, float]]:
    """Each shadow comparison's (time, teacher cost), oldest first."""
    return [(row["created_at"], float(row["cost_usd"])) for row in store.query(_SHADOW_COSTS_SQL)]
