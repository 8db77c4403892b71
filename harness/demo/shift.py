"""The shift phase's figures (issue 17): when the intent mix shifted, when drift started a
training cycle early, which version was promoted after it, and how the student served the
new intents before and after that version.

"Before" is the new-intent requests sent between the shift and that version's promotion,
"after" those sent after it: the same intents, the live version the only difference.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Collection
from typing import Any

from core.store.reporting import Queryable
from harness.demo.savings import request_position
from harness.demo.traffic import Outcome

DRIFT_ACTION = "drift_retrain"  # gateway/training/drift.py's audit action (the harness reads the store)


def drift_retrains(store: Queryable, route: str | None) -> list[dict[str, Any]]:
    """The route's (None: every route's) drift-started cycles from the audit log, oldest
    first: when, why, with how many new answers, and the window's shares at the time."""
    rows = store.query("select at, new_json from route_audit where field = ? and (? is null or route = ?) order by at",
                       [DRIFT_ACTION, route, route])
    return [{**json.loads(row["new_json"] or "{}"), "at": row["at"]} for row in rows]


def new_intent_figures(outcomes: list[Outcome]) -> dict[str, Any]:
    """How new-intent requests were served: the student's share, accuracy overall and of the
    student's answers, and which versions answered."""
    served = [outcome for outcome in outcomes if outcome.error is None]
    student = [outcome for outcome in served if outcome.target == "student"]
    return {"requests": len(outcomes), "failed": len(outcomes) - len(served),
            "student_share": _share(len(student), len(served)),
            "accuracy": _share(sum(outcome.correct for outcome in served), len(served)),
            "student_accuracy": _share(sum(outcome.correct for outcome in student), len(student)),
            "student_versions": dict(Counter(outcome.student_version or "?" for outcome in student))}


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _promotion_after(versions: list[dict[str, Any]], at: float, until: float) -> dict[str, Any] | None:
    promoted = sorted((row for row in versions if row.get("promoted_at") and at <= row["promoted_at"] <= until),
                      key=lambda row: row["promoted_at"])
    return promoted[0] if promoted else None


def shift_section(outcomes: list[Outcome], shift_at: int, held_back: Collection[str],
                  retrains: list[dict[str, Any]], versions: list[dict[str, Any]], stream_end: float,
                  min_new_examples: int) -> dict[str, Any]:
    """The shift's figures. ``shift_at`` is 1-based (the first request of the new mix);
    ``versions`` are the store's student_versions rows; ``min_new_examples`` the route's
    ``training.min_new_examples``, which an early cycle did not wait for."""
    ordered = sorted(outcomes, key=lambda outcome: outcome.index)
    sent_at = sorted(outcome.sent_at for outcome in ordered)
    shifted_at = ordered[shift_at - 1].sent_at if len(ordered) >= shift_at else stream_end
    cycles = [{"after_request": request_position(sent_at, row["at"]), "new_examples": row.get("new_examples"),
               "early": (row.get("new_examples") or 0) < min_new_examples, "live_version": row.get("version"),
               "novel_share": row.get("novel_share"), "ood_share": row.get("ood_share"), "reason": row.get("reason"),
               "at": row["at"]} for row in retrains if row["at"] <= stream_end]
    after_shift = [cycle for cycle in cycles if cycle["at"] >= shifted_at]
    first = after_shift[0] if after_shift else None
    promoted = _promotion_after(versions, first["at"], stream_end) if first else None
    new = [outcome for outcome in ordered[shift_at - 1:] if outcome.query.label in held_back]
    boundary = promoted["promoted_at"] if promoted else stream_end
    return {
        "at_request": shift_at,
        "held_back_intents": sorted(held_back),
        "new_intent_requests": len(new),
        "drift_retrains": [{key: value for key, value in cycle.items() if key != "at"} for cycle in cycles],
        "drift_retrains_before_shift": len(cycles) - len(after_shift),
        "first_drift_retrain_request": first["after_request"] if first else None,
        "requests_from_shift_to_drift_retrain": first["after_request"] - shift_at + 1 if first else None,
        "version_after_drift": None if promoted is None else {
            "version": promoted["version"], "promoted_after_request": request_position(sent_at, promoted["promoted_at"])},
        "new_intents_before": new_intent_figures([outcome for outcome in new if outcome.sent_at < boundary]),
        "new_intents_after": new_intent_figures([outcome for outcome in new if outcome.sent_at >= boundary])
        if promoted else None,
    }
