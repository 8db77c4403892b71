"""Savings over the stream, request by request, net of what the loop itself costs.

net savings = all-teacher cost - actual cost (teacher and student serving) - shadow calls
              - training compute

Training is priced per hour of a run's wall time (``costs`` in the config); a run's cost
accrues evenly between its start and its finish, placed on the stream by the requests sent
meanwhile. The **break-even** request is the one from which net savings stay above zero.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from core.config import CostsConfig
from harness.demo.report import Reference
from harness.demo.traffic import Outcome

SERIES_POINTS = 250


@dataclass(frozen=True)
class TrainingCharge:
    version: str | None
    outcome: str | None
    device: str
    started_at: float
    finished_at: float
    cost_usd: float

    def accrued(self, at: float) -> float:
        """The share of this run's cost spent by time ``at``."""
        if at <= self.started_at:
            return 0.0
        if at >= self.finished_at or self.finished_at <= self.started_at:
            return self.cost_usd
        return self.cost_usd * (at - self.started_at) / (self.finished_at - self.started_at)


def training_charges(runs: list[dict[str, Any]], costs: CostsConfig, until: float) -> list[TrainingCharge]:
    """The runs started before ``until`` (the stream's end), each with what it cost."""
    return [TrainingCharge(run["version"], run["outcome"], run["device"], run["started_at"], run["finished_at"],
                           costs.training_cost(run["seconds"], run["device"]))
            for run in runs if run["started_at"] < until]


def request_position(sent_at: list[float], at: float) -> int:
    """How many stream requests had been sent by time ``at`` (``sent_at`` sorted)."""
    return bisect.bisect_right(sent_at, at)


def break_even(net: list[float], first_charge: int | None) -> int | None:
    """The 1-based request from which net savings stay above zero, counted from the first
    training charge; None when nothing was charged or the stream ends at or below zero."""
    if first_charge is None or not net or net[-1] <= 0:
        return None
    last_below = max((index for index in range(first_charge, len(net)) if net[index] <= 0), default=first_charge - 1)
    return last_below + 2


def _cumulative(values: list[float]) -> list[float]:
    total, out = 0.0, []
    for value in values:
        total += value
        out.append(total)
    return out


def _sample(count: int, points: int = SERIES_POINTS) -> list[int]:
    if count <= points:
        return list(range(count))
    return sorted({round(step * (count - 1) / (points - 1)) for step in range(points)})


def timeline(outcomes: list[Outcome], references: list[Reference], request_costs: dict[str, float],
             shadow: list[tuple[float, float]], charges: list[TrainingCharge], until: float) -> dict[str, Any]:
    """Cumulative costs and net savings after each stream request, and the break-even request.
    ``shadow`` is (time, cost) of each shadow call; those after ``until`` are not the stream's."""
    count = len(outcomes)
    sent_at = sorted(outcome.sent_at for outcome in outcomes)
    served = [outcome.error is None for outcome in outcomes]
    actual = [request_costs.get(o.request_id or "", 0.0) if ok else 0.0 for o, ok in zip(outcomes, served, strict=True)]
    teacher = [ref.cost_usd if ok else 0.0 for ref, ok in zip(references, served, strict=True)]
    shadow_per_request = [0.0] * count
    for at, cost in shadow:
        if at <= until and count:
            shadow_per_request[min(count - 1, max(0, request_position(sent_at, at) - 1))] += cost
    # Time of request i, for the training accrued by then (the stream's order is send order).
    times = [outcome.sent_at for outcome in outcomes]
    training = [sum(charge.accrued(at) for charge in charges) for at in times]
    if charges and times:
        training[-1] = sum(charge.cost_usd for charge in charges)  # runs that end after the stream count whole
    cumulative_actual = [a + s for a, s in zip(_cumulative(actual), _cumulative(shadow_per_request), strict=True)]
    cumulative_teacher = _cumulative(teacher)
    net = [t - a - c for t, a, c in zip(cumulative_teacher, cumulative_actual, training, strict=True)]
    first_charge = next((index for index, spent in enumerate(training) if spent > 0), None)
    points = _sample(count)
    return {
        "actual_cost_usd": round(sum(actual), 6),
        "shadow_cost_usd": round(sum(shadow_per_request), 6),
        "all_teacher_cost_usd": round(sum(teacher), 6),
        "training_cost_usd": round(training[-1] if training else 0.0, 6),
        "gross_savings_usd": round(sum(teacher) - sum(actual) - sum(shadow_per_request), 6),
        "net_savings_usd": round(net[-1], 6) if net else None,
        "break_even_request": break_even(net, first_charge),
        "series": {
            "request": [index + 1 for index in points],
            "actual_cost_usd": [round(cumulative_actual[index], 6) for index in points],
            "all_teacher_cost_usd": [round(cumulative_teacher[index], 6) for index in points],
            "training_cost_usd": [round(training[index], 6) for index in points],
            "net_savings_usd": [round(net[index], 6) for index in points],
        },
    }


def training_summary(charges: list[TrainingCharge], costs: CostsConfig, sent_at: list[float]) -> dict[str, Any]:
    """The stream's training runs: each one's device, wall time, cost and place on the stream."""
    return {
        "prices": costs.model_dump(),
        "runs": [{"version": charge.version, "outcome": charge.outcome, "device": charge.device,
                  "seconds": round(charge.finished_at - charge.started_at, 1), "cost_usd": round(charge.cost_usd, 6),
                  "started_after_request": request_position(sent_at, charge.started_at),
                  "finished_after_request": request_position(sent_at, charge.finished_at)} for charge in charges],
        "hours": round(sum(charge.finished_at - charge.started_at for charge in charges) / 3600, 4),
        "cost_usd": round(sum(charge.cost_usd for charge in charges), 6),
    }
