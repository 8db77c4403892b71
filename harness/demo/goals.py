"""The issue's goals for a demo run (issue 11), each with its figure, target and verdict.

A goal is ``met`` only when its figure is defined, reaches the target, and no request of the
run failed: a failed request costs nothing and is served by nobody, so a run whose requests
failed shows a low cost and shares over whatever happened to succeed (2,000 requests that
all failed with 401 once read "cost <= 0.35: met"). Such a figure is ``undefined``, as is one
with nothing to measure (no in-scope request served, no held-out reference).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MET, NOT_MET, UNDEFINED = "met", "not met", "undefined"

FULL_PROMOTION_WITHIN = 3000
FULL_LAST_WINDOW = 2000


@dataclass(frozen=True)
class Goal:
    figure: float | int | None
    target: str
    status: str
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"figure": self.figure, "target": self.target, "status": self.status, "met": self.status == MET,
                "note": self.note}


def judge(figure: float | int | None, target: str, passes: Callable[[float], bool], failed_requests: int, *,
          missing: str = UNDEFINED, missing_note: str = "nothing to measure") -> Goal:
    """The verdict on one figure: ``missing`` when there is none, ``not met`` when it misses
    the target, ``undefined`` when it reaches it but requests failed, else ``met``."""
    if figure is None:
        return Goal(None, target, missing, missing_note)
    if not passes(figure):
        return Goal(figure, target, NOT_MET)
    if failed_requests:
        return Goal(figure, target, UNDEFINED,
                    f"{failed_requests} requests failed: the figure covers only those that succeeded")
    return Goal(figure, target, MET)


def accuracy_gap(section: dict[str, Any]) -> float | None:
    """All-teacher minus served in-scope accuracy (0.015 = 1.5 points); None when undefined."""
    served, teacher = section.get("in_scope_accuracy"), section.get("all_teacher_in_scope_accuracy")
    return None if served is None or teacher is None else round(teacher - served, 4)


def _accuracy_goal(result: dict[str, Any], points: float, failed: int) -> Goal:
    goal = judge(accuracy_gap(result["heldout"]), f"<= {points / 100:.3f}", lambda v: v <= points / 100, failed)
    if goal.status == MET and not result["heldout"].get("student_share"):
        # True, and worth saying: with no student answer there is nothing to lose.
        return Goal(goal.figure, goal.target, goal.status, "the teacher served every held-out query")
    return goal


def _failed(result: dict[str, Any]) -> int:
    return int(result["overall"]["failed_requests"]) + int(result["heldout"]["failed_requests"])


def full_goals(result: dict[str, Any]) -> dict[str, Goal]:
    """The full demo (10,000 requests at 10/s): what a user must see."""
    failed, loop = _failed(result), result["loop"]
    return {
        "first promotion within the first 3,000 requests": judge(
            loop["first_promotion_request"], f"<= {FULL_PROMOTION_WITHIN}",
            lambda n: n <= FULL_PROMOTION_WITHIN, failed, missing=NOT_MET, missing_note="no promotion during the stream"),
        "student serves >= 70% of in-scope traffic over the last 2,000 requests": judge(
            result["last_window"]["in_scope_student_share"], ">= 0.70", lambda v: v >= 0.70, failed),
        "held-out in-scope accuracy within 1.5 points of all-teacher": _accuracy_goal(result, 1.5, failed),
        "held-out OOS sent to the teacher >= 95%": judge(
            result["heldout"]["oos_recall_sent_to_teacher"], ">= 0.95", lambda v: v >= 0.95, failed),
        "cost <= 35% of all-teacher (whole stream, shadow calls included)": judge(
            result["overall"]["cost_vs_all_teacher"], "<= 0.35", lambda v: v <= 0.35, failed),
        "zero failed requests": judge(failed, "== 0", lambda n: n == 0, 0),
    }


def quick_goals(result: dict[str, Any]) -> dict[str, Goal]:
    """The quick demo (the CI run): the loop must close at least once."""
    failed, phases = _failed(result), result["phases"]
    return {
        "at least one promotion during the stream": judge(
            result["loop"]["promotions_during_stream"], ">= 1", lambda n: n >= 1, failed),
        "student serves >= 30% of in-scope traffic in the last phase": judge(
            phases[-1]["in_scope_student_share"] if phases else None, ">= 0.30", lambda v: v >= 0.30, failed),
        "held-out in-scope accuracy within 2 points of all-teacher": _accuracy_goal(result, 2.0, failed),
        "zero failed requests": judge(failed, "== 0", lambda n: n == 0, 0),
    }


def shift_goals(result: dict[str, Any]) -> dict[str, Goal]:
    """The shift phase (issue 17), when the run has one: drift starts a cycle early, and the
    version promoted after it serves the new intents."""
    failed, shift = _failed(result), result["shift"]
    first = shift["first_drift_retrain_request"]
    early = next((cycle["early"] for cycle in shift["drift_retrains"] if cycle["after_request"] == first), False)
    after = shift["new_intents_after"] or {}
    return {
        "shift: drift starts a training cycle early after the shift": judge(
            first if early else None, f">= {shift['at_request']}", lambda n: n >= shift["at_request"], failed,
            missing=NOT_MET, missing_note="no drift-started cycle after the shift with fewer answers than "
                                          "training.min_new_examples"),
        "shift: the version promoted after it serves the new intents": judge(
            after.get("student_share"), "> 0", lambda v: v > 0, failed, missing=NOT_MET,
            missing_note="no version promoted after a drift-started cycle"),
    }


def goals(result: dict[str, Any], quick: bool) -> dict[str, dict[str, Any]]:
    chosen = quick_goals(result) if quick else full_goals(result)
    if result.get("shift") is not None:
        chosen = {**chosen, **shift_goals(result)}
    return {name: goal.to_dict() for name, goal in chosen.items()}
