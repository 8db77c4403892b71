"""The dashboard's view models: plain dicts built from ``core.store.reporting`` and the live
route table, ready for the templates. Blocking store reads; callers run them in a thread."""

from __future__ import annotations

import json
import time
from typing import Any

from core.store import reporting
from gateway.route_table import RouteState, RouteTable
from router.calibration import route_calibration

WINDOWS = ("1h", "24h", "7d", "30d", "all")
DEFAULT_WINDOW = "7d"


def _live(state: RouteState) -> dict[str, Any]:
    described = state.describe()
    return {"name": described["name"], "mode": described["mode"], "ood_threshold": described["ood_threshold"],
            "student_version": described["student_version"], "teacher_model": described["teacher_model"],
            "shadow_rate": described["shadow_rate"]}


def key_rows(store: reporting.Queryable, since_s: float | None, names: dict[str, str],
             budgets: dict[str, dict[str, Any]]) -> list[reporting.KeySummary]:
    """Per client key: cost, all-teacher cost and savings in the window; named from the
    config, and for a budgeted key its live spend this month (the gateway's running total)."""
    keys = reporting.key_summaries(store, since_s)
    seen = {summary.client_key_id for summary in keys}
    keys += [reporting.KeySummary(client_key_id) for client_key_id in budgets if client_key_id not in seen]
    for summary in keys:
        budget = budgets.get(summary.client_key_id or "")
        summary.name = names.get(summary.client_key_id or "")
        if budget is not None:
            summary.monthly_budget_usd, summary.month_spend_usd = budget["monthly_budget_usd"], budget["month_spend_usd"]
    return keys


def overview(store: reporting.Queryable, routes: RouteTable, since: str, key_names: dict[str, str] | None = None,
             budgets: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every configured route's summary, and every client key's, for the index page."""
    states = {state.config.name: state for state in routes}
    summaries = reporting.route_summaries(store, list(states), reporting.parse_since(since))
    keys = key_rows(store, reporting.parse_since(since), key_names or {}, budgets or {})
    rows = []
    for summary in summaries:
        state = states.get(summary.route)
        rows.append({"summary": summary, "live": _live(state) if state else None})
    totals = {
        "requests": sum(s.requests for s in summaries),
        "cost_usd": sum(s.cost_usd for s in summaries),
        "teacher_cost_usd": sum(s.teacher_cost_usd for s in summaries),
    }
    totals["savings_usd"] = totals["teacher_cost_usd"] - totals["cost_usd"]
    return {"rows": rows, "keys": keys, "totals": totals, "since": since, "windows": WINDOWS}


def _version_rows(store: Any, route: str) -> list[dict[str, Any]]:
    rows = []
    for row in store.versions(route):
        metrics = json.loads(row.get("metrics_json") or "{}")
        shown = {key: value for key, value in metrics.items() if isinstance(value, int | float)}
        rows.append({**row, "metrics": shown})
    return rows


def route_page(store: Any, state: RouteState, since: str, drift: Any = None) -> dict[str, Any]:
    """Everything the per-route page shows; ``chart_data`` goes to the browser as JSON.
    ``drift`` is the training loop's DriftWatch (None: not tracked)."""
    route = state.config.name
    since_s = reporting.parse_since(since)
    [summary] = [s for s in reporting.route_summaries(store, [route], since_s) if s.route == route]
    live = _live(state)
    series = reporting.cost_series(store, route, since_s)
    calibration = route_calibration(store, route, live["ood_threshold"], since_s)
    latency_rows = [{"target": target, **values} for target, values in sorted(summary.latency_ms.items())
                    if target != "all"]
    chart_data = {
        "route": route,
        "ood_threshold": live["ood_threshold"],
        "cost": {
            "t": [point["bucket"] for point in series],
            # One bucket each side, so a single point is not stretched over years.
            "x_range": [series[0]["bucket"] - series[0]["bucket_s"], series[-1]["bucket"] + series[-1]["bucket_s"]]
            if series else None,
            "actual": [point["cumulative_cost_usd"] for point in series],
            "teacher": [point["cumulative_teacher_cost_usd"] for point in series],
            "student_share": [point["student_requests"] / point["requests"] if point["requests"] else None
                              for point in series],
        },
        "calibration": calibration,
    }
    return {
        "route": route,
        "live": live,
        "summary": summary,
        "latency_rows": latency_rows,
        "versions": _version_rows(store, route),
        "training_runs": store.training_runs(route)[:10],
        "drift": drift.status(route) if drift is not None else {"tracked": False},
        "calibration": calibration,
        "chart_data": chart_data,
        "since": since,
        "windows": WINDOWS,
        "generated_at": time.time(),
    }
