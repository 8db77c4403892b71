"""The demo's figures: per phase and overall, beside the all-teacher counterfactual."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from harness.demo.traffic import Outcome

# CLINC150 paper (Larson et al., 2019), Table 2, "Full" dataset rows, for comparison.
PAPER_ROWS = {
    "BERT oos-threshold": {"in_scope_accuracy": 0.962, "oos_recall": 0.523},
    "BERT oos-train": {"in_scope_accuracy": 0.969, "oos_recall": 0.403},
}


@dataclass(frozen=True)
class Reference:
    """What the teacher alone would have answered and cost for one query."""

    answer: str
    cost_usd: float


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 1)


def _latency(outcomes: list[Outcome], target: str) -> dict[str, float | None]:
    values = [outcome.latency_ms for outcome in outcomes if outcome.target == target and outcome.error is None]
    return {"p50_ms": _percentile(values, 0.5), "p99_ms": _percentile(values, 0.99),
            "mean_ms": round(statistics.fmean(values), 1) if values else None}


def summarize(outcomes: list[Outcome], references: list[Reference], costs: dict[str, float]) -> dict[str, Any]:
    """Figures for a slice of the stream. ``costs`` maps request ids to what they cost."""
    served = [outcome for outcome in outcomes if outcome.error is None]
    in_scope = [outcome for outcome in served if outcome.query.in_scope]
    out_of_scope = [outcome for outcome in served if not outcome.query.in_scope]
    reference_by_index = {outcome.index: references[position] for position, outcome in enumerate(outcomes)}
    teacher_correct_in_scope = sum(
        reference_by_index[outcome.index].answer == outcome.query.label for outcome in in_scope)
    actual_cost = sum(costs.get(outcome.request_id or "", 0.0) for outcome in served)
    # Over the served requests only: a failed request cost nothing and saved nothing.
    all_teacher_cost = sum(reference_by_index[outcome.index].cost_usd for outcome in served)
    return {
        "requests": len(outcomes),
        "failed_requests": len(outcomes) - len(served),
        "student_share": _share(sum(outcome.target == "student" for outcome in served), len(served)),
        "in_scope_student_share": _share(sum(outcome.target == "student" for outcome in in_scope), len(in_scope)),
        "accuracy": _share(sum(outcome.correct for outcome in served), len(served)),
        "in_scope_accuracy": _share(sum(outcome.correct for outcome in in_scope), len(in_scope)),
        "all_teacher_in_scope_accuracy": _share(teacher_correct_in_scope, len(in_scope)),
        "all_teacher_accuracy": _share(
            sum(reference_by_index[o.index].answer == o.query.label for o in served), len(served)),
        "oos_sent_to_teacher": _share(sum(outcome.target == "teacher" for outcome in out_of_scope), len(out_of_scope)),
        "oos_answered_oos": _share(sum(outcome.correct for outcome in out_of_scope), len(out_of_scope)),
        "cost_usd": round(actual_cost, 6),
        "all_teacher_cost_usd": round(all_teacher_cost, 6),
        "cost_vs_all_teacher": _share_float(actual_cost, all_teacher_cost),
        "latency_by_target": {target: _latency(served, target) for target in ("student", "teacher")},
    }


def _share_float(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole else None


def phases(outcomes: list[Outcome], references: list[Reference], costs: dict[str, float],
           phase_size: int) -> list[dict[str, Any]]:
    rows = []
    for start in range(0, len(outcomes), phase_size):
        figures = summarize(outcomes[start:start + phase_size], references[start:start + phase_size], costs)
        rows.append({"phase": len(rows) + 1, "first_request": start + 1, **figures})
    return rows


def heldout_section(outcomes: list[Outcome], references: list[Reference], costs: dict[str, float]) -> dict[str, Any]:
    figures = summarize(outcomes, references, costs)
    return {
        "queries": len(outcomes),
        "failed_requests": figures["failed_requests"],
        "in_scope_accuracy": figures["in_scope_accuracy"],
        "oos_recall_sent_to_teacher": figures["oos_sent_to_teacher"],
        "oos_recall_answered_oos": figures["oos_answered_oos"],
        "student_share": figures["student_share"],
        "cost_vs_all_teacher": figures["cost_vs_all_teacher"],
        "all_teacher_in_scope_accuracy": figures["all_teacher_in_scope_accuracy"],
        "paper_table_2_full": PAPER_ROWS,
    }

