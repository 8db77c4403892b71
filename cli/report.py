"""``distillgate report``: per-route requests, student share, cost, all-teacher cost, savings,
savings net of the loop's own cost (shadow calls and training compute, priced under ``costs``
in the config), shadow agreement, feedback on student answers, latency and live version, read
from the store (the gateway need not run). ``--by key``: the same cost figures per client key, with each budgeted key's
spend this month.

The store knows a key only by its short hash; a key is named by its ``key_env`` when that
variable is set where the report runs. The key itself is never printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from core.config import ConfigError, Settings, load_settings
from core.store import reporting
from gateway.keys import resolved_keys
from gateway.route_table import BASE_MODEL_VERSION

logger = logging.getLogger(__name__)


def _open_store(settings: Settings) -> Any:
    from core.store import open_store

    # A report must not create a database as a side effect: no file yet reads as an empty store.
    return open_store(settings.store, create=False)


def _live_version(store: Any, settings: Settings, route: str) -> str | None:
    live = store.live_version(route)
    if live is not None:
        return live["version"]
    config = settings.route(route)
    return BASE_MODEL_VERSION if config is not None and config.student.serve_base_model else None


def collect(settings: Settings, since_s: float | None) -> list[reporting.RouteSummary]:
    """Every configured route's summary (plus routes found only in the store)."""
    store = _open_store(settings)
    try:
        summaries = reporting.route_summaries(store, [route.name for route in settings.routes], since_s,
                                               settings.costs)
        for summary in summaries:
            summary.live_version = _live_version(store, settings, summary.route)
        return summaries
    finally:
        store.close()


def collect_keys(settings: Settings, since_s: float | None) -> list[reporting.KeySummary]:
    """Every client key's summary in the window, named and with its month's spend where the
    config has a policy for it (and its variable is set here)."""
    policies = resolved_keys(settings.auth)
    store = _open_store(settings)
    try:
        summaries = reporting.key_summaries(store, since_s)
        month_spend = reporting.month_spend_by_key(store) if any(
            entry.monthly_budget_usd is not None for _, entry in policies) else {}
    finally:
        store.close()
    by_id = {summary.client_key_id: summary for summary in summaries}
    for client_key_id, entry in policies:
        # A configured key appears even before its first request, with its budget.
        summary = by_id.get(client_key_id)
        if summary is None:
            summary = by_id[client_key_id] = reporting.KeySummary(client_key_id)
            summaries.append(summary)
        summary.name = entry.key_env
        if entry.monthly_budget_usd is not None:
            summary.monthly_budget_usd = entry.monthly_budget_usd
            summary.month_spend_usd = month_spend.get(client_key_id, 0.0)
    return summaries


def _money(value: float) -> str:
    sign = "-" if value < 0 else ""
    return f"{sign}${abs(value):,.2f}" if abs(value) >= 100 else f"{sign}${abs(value):,.6f}"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _student_feedback(summary: reporting.RouteSummary) -> str:
    """Feedback rows on student answers, and the thumbs-down share of those rated."""
    if not summary.student_feedback:
        return "—"
    return f"{summary.student_feedback} ({_percent(summary.student_thumbs_down_share)} down)"


def render_table(summaries: list[reporting.RouteSummary], since: str) -> Any:
    from rich.table import Table

    table = Table(title=f"distillgate — last {since}" if since != "all" else "distillgate — all time")
    for column in ("route", "requests", "student share", "cost", "all-teacher cost", "savings", "training",
                   "net savings", "agreement served/all", "student feedback", "p50", "p99", "live version"):
        table.add_column(column, justify="left" if column in ("route", "live version") else "right")
    for summary in summaries:
        table.add_row(summary.route, str(summary.requests), _percent(summary.student_share),
                      _money(summary.cost_usd), _money(summary.teacher_cost_usd), _money(summary.savings_usd),
                      f"{_money(summary.training_cost_usd)} ({summary.training_runs})",
                      _money(summary.net_savings_usd),
                      f"{_percent(summary.served_agreement)} / {_percent(summary.agreement)}", _student_feedback(summary),
                      _ms(summary.latency("p50")), _ms(summary.latency("p99")),
                      summary.live_version or "none")
    if len(summaries) > 1:
        cost, teacher = sum(s.cost_usd for s in summaries), sum(s.teacher_cost_usd for s in summaries)
        training, net = sum(s.training_cost_usd for s in summaries), sum(s.net_savings_usd for s in summaries)
        table.add_section()
        table.add_row("total", str(sum(s.requests for s in summaries)), "", _money(cost), _money(teacher),
                      _money(teacher - cost), _money(training), _money(net), "", "", "", "", "")
    return table


def _budget(summary: reporting.KeySummary) -> str:
    if summary.monthly_budget_usd is None or summary.month_spend_usd is None:
        return "—"
    return f"{_money(summary.month_spend_usd)} of {_money(summary.monthly_budget_usd)}"


def render_key_table(summaries: list[reporting.KeySummary], since: str) -> Any:
    from rich.table import Table

    window = f"last {since}" if since != "all" else "all time"
    table = Table(title=f"distillgate — spend by client key, {window}")
    for column in ("key", "requests", "student share", "cost", "all-teacher cost", "savings", "this month / budget"):
        table.add_column(column, justify="left" if column == "key" else "right")
    for summary in summaries:
        table.add_row(summary.label, str(summary.requests), _percent(summary.student_share), _money(summary.cost_usd),
                      _money(summary.teacher_cost_usd), _money(summary.savings_usd), _budget(summary))
    if len(summaries) > 1:
        cost, teacher = sum(s.cost_usd for s in summaries), sum(s.teacher_cost_usd for s in summaries)
        table.add_section()
        table.add_row("total", str(sum(s.requests for s in summaries)), "", _money(cost), _money(teacher),
                      _money(teacher - cost), "")
    return table


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
        since_s = reporting.parse_since(args.since)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.by == "key":
        keys = collect_keys(settings, since_s)
        if args.json:
            print(json.dumps({"since": args.since, "keys": [summary.to_dict() for summary in keys]}, indent=2))
            return 0
        table = render_key_table(keys, args.since)
    else:
        summaries = collect(settings, since_s)
        if args.json:
            print(json.dumps({"since": args.since, "training_prices": settings.costs.model_dump(),
                              "routes": [summary.to_dict() for summary in summaries]}, indent=2))
            return 0
        table = render_table(summaries, args.since)
    from rich.console import Console

    # Piped output (a file, CI log) gets a wide table rather than rich's 80-column default.
    console = Console() if sys.stdout.isatty() else Console(width=180)
    console.print(table)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="per-route cost, savings, student share and quality",
                                   description="Per-route requests, student share, cost, all-teacher cost, "
                                               "savings, training cost (runs), net savings (after shadow calls "
                                               "and training), shadow agreement, feedback on student answers "
                                               "(thumbs-down share), p50/p99 latency and live version.")
    parser.add_argument("--config", required=True, help="the gateway's YAML config (names the store)")
    parser.add_argument("--since", default="24h", help="window: e.g. 30m, 24h, 7d, or all (default 24h)")
    parser.add_argument("--by", choices=("route", "key"), default="route",
                        help="break cost down by route (default) or by client key, with budgets")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)
