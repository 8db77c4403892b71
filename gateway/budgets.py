"""Per-key monthly budgets (``auth.keys[*].monthly_budget_usd`` and ``over_budget``).

A key's spend is the sum of its requests' ``cost_usd`` in the current calendar month (UTC):
what its traffic cost, student and teacher, not the loop's own shadow calls or training.
It is kept in memory as a running total per budgeted key, seeded from the store with one
query when the gateway starts and added to as each request is accounted (an observer of
the request log, which sees every row with its cost). Checking a budget is a dict lookup;
the request path runs no SQL.

Once a key has spent its budget: ``refuse`` answers 429 (``budget_exceeded``);
``student_only`` lets only the student answer (no cascade, no shadow call, no teacher
fallback) and answers 429 when no student can. With several gateway replicas, each counts
the requests it served since it started on top of what the store held then.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from core.config import AuthConfig
from core.store import reporting
from gateway.chat.record import RequestRecord
from gateway.errors import BudgetExceeded
from gateway.keys import resolved_keys

logger = logging.getLogger(__name__)

OverBudget = Literal["student_only", "refuse"]


@dataclass(frozen=True)
class Budget:
    name: str
    monthly_usd: float
    over_budget: OverBudget


def next_month_start(month_start: float) -> float:
    start = dt.datetime.fromtimestamp(month_start, dt.UTC)
    year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
    return start.replace(year=year, month=month).timestamp()


class KeyBudgets:
    """The budgeted keys' spend this month, and what their requests may do."""

    def __init__(self, config: AuthConfig, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._budgets = {client_key_id: Budget(entry.key_env, entry.monthly_budget_usd, entry.over_budget_action)
                         for client_key_id, entry in resolved_keys(config) if entry.monthly_budget_usd is not None}
        self._spent: dict[str, float] = {}
        self._month_start = reporting.month_start_utc(clock())
        self._month_end = next_month_start(self._month_start)

    def __bool__(self) -> bool:
        return bool(self._budgets)

    def seed(self, store: reporting.Queryable, now: float | None = None) -> None:
        """This month's spend so far, from the store (one query; at startup)."""
        now = self._clock() if now is None else now
        self._month_start = reporting.month_start_utc(now)
        self._month_end = next_month_start(self._month_start)
        if not self._budgets:
            return
        spent = reporting.month_spend_by_key(store, now)
        self._spent = {client_key_id: spent.get(client_key_id, 0.0) for client_key_id in self._budgets}

    def _roll(self, now: float) -> None:
        """A new month starts every key's spend at zero."""
        if now >= self._month_end:
            self._month_start = reporting.month_start_utc(now)
            self._month_end = next_month_start(self._month_start)
            self._spent.clear()

    def observe(self, record: RequestRecord) -> None:
        """Count an accounted request's cost (a request log observer)."""
        client_key_id = record.client_key_id
        if client_key_id is None or client_key_id not in self._budgets or not record.cost_usd:
            return
        self._roll(self._clock())
        if record.created_at >= self._month_start:  # a request begun last month is last month's
            self._spent[client_key_id] = self._spent.get(client_key_id, 0.0) + record.cost_usd

    def spent(self, client_key_id: str, now: float | None = None) -> float:
        self._roll(self._clock() if now is None else now)
        return self._spent.get(client_key_id, 0.0)

    def over_budget(self, client_key_id: str | None, now: float | None = None) -> OverBudget | None:
        """What this key's requests may do now: None while it is within its budget."""
        budget = self._budgets.get(client_key_id or "")
        if budget is None or client_key_id is None or self.spent(client_key_id, now) < budget.monthly_usd:
            return None
        return budget.over_budget

    def exceeded(self, client_key_id: str | None, why: str = "", now: float | None = None) -> BudgetExceeded:
        """The 429 for a key past its budget; ``why`` says what could not serve it."""
        budget = self._budgets[client_key_id or ""]
        now = self._clock() if now is None else now
        until = dt.datetime.fromtimestamp(self._month_end, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        logger.info("client key over its monthly budget", extra={"key_id": client_key_id, "why": why})
        # Cents when the budget is in cents; otherwise as configured (not rounded to $0.00).
        amount = f"${budget.monthly_usd:,.2f}" if round(budget.monthly_usd, 2) == budget.monthly_usd \
            else f"${budget.monthly_usd:g}"
        message = f"This API key has spent its monthly budget of {amount}" + (f"; {why}." if why else ".")
        # The SDKs retry a 429 unless told not to; this one lasts until the month turns.
        return BudgetExceeded(f"{message} The budget renews at {until}.",
                              headers={"retry-after": str(max(1, math.ceil(self._month_end - now))),
                                       "x-should-retry": "false"})

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Key id -> name, budget, spend this month and the over-budget action (dashboard)."""
        return {client_key_id: {"name": budget.name, "monthly_budget_usd": budget.monthly_usd,
                                "month_spend_usd": self.spent(client_key_id), "over_budget": budget.over_budget}
                for client_key_id, budget in self._budgets.items()}
