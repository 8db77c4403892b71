"""The lowest whole-stream cost a distillation loop could reach with a given student (issue 11).

The demo's cost goal counts every request of the stream, shadow calls included. How low it can
go is bounded by how fast the student learns, and this computes that bound for an *ideal* loop:
the student is retrained after every teacher answer, with no cycle time, no gate and no lag,
and from the first request it serves the share of in-scope traffic the learning curve says a
version trained on that many answers can serve at the route's target agreement. Out-of-scope
requests always go to the teacher. Requests the student serves teach it nothing but their shadow
calls, so data grows more slowly once it serves (as in the product). Anything the real loop does
(cycles of minutes, the gate's refusals) can only cost more.

    python bench/cost_bound.py --curve 1000:0.342,2000:0.583,3000:0.693
    python bench/cost_bound.py --train-json out/train.json      # bench/train.py's --out

The curve is the share of in-scope prompts a version serves at the route's target agreement,
against the number of answers it was trained on (``bench/train.py``'s served_share; between
points it is interpolated, before the first point it rises from 0 at 0 answers, beyond the last
it stays at the last unless ``--final`` gives a share reached at ``--requests`` answers).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEMO_REQUESTS = 10_000
DEMO_OOS_RATE = 0.1  # the full demo's out-of-scope share
SHADOW_RATE = 0.05  # configs/default.yaml: 1 in 20 student answers re-asked of the teacher
HOLDOUT_FRACTION = 0.1  # the trainer keeps a tenth of the answers out of training
COST_GOAL = 0.35


def whole_stream_cost(curve: Sequence[tuple[int, float]], *, requests: int = DEMO_REQUESTS,
                      oos_rate: float = DEMO_OOS_RATE, shadow_rate: float = SHADOW_RATE,
                      holdout_fraction: float = HOLDOUT_FRACTION, student_cost_ratio: float = 0.0) -> dict[str, Any]:
    """Expected cost of the stream as a share of all-teacher, for a loop that never lags its data.

    ``student_cost_ratio`` is a student answer's price over a teacher answer's (about 0 on the demo's
    prices: the teacher reads the app's long system prompt, the student a short one).
    """
    answers = np.array([0.0] + [float(point[0]) for point in curve])
    shares = np.array([0.0] + [float(point[1]) for point in curve])
    teacher_answers = cost = served = 0.0
    first_serving: int | None = None
    for request in range(1, requests + 1):
        share = float(np.interp(teacher_answers * (1 - holdout_fraction), answers, shares))
        student = (1 - oos_rate) * share
        cost += (1 - student) + student * (student_cost_ratio + shadow_rate)
        teacher_answers += (1 - student) + student * shadow_rate
        served += student
        if first_serving is None and share > 0.01:
            first_serving = request
    return {"cost_vs_all_teacher": round(cost / requests, 4), "meets_goal": cost / requests <= COST_GOAL,
            "in_scope_student_share": round(served / (requests * (1 - oos_rate)), 4),
            "final_in_scope_share": round(share, 4), "training_answers_at_end": round(teacher_answers),
            "first_request_served_by_student": first_serving}


def parse_curve(text: str) -> list[tuple[int, float]]:
    """``"1000:0.342,2000:0.583"`` -> [(1000, 0.342), (2000, 0.583)], checked."""
    points = []
    for item in text.split(","):
        answers, _, share = item.partition(":")
        points.append((int(answers), float(share)))
    if any(not 0 <= share <= 1 for _, share in points) or [a for a, _ in points] != sorted({a for a, _ in points}):
        raise SystemExit(f"--curve: answers must rise and shares lie in [0, 1]: {text!r}")
    return points


def curve_from_train_json(path: Path) -> list[tuple[int, float]]:
    """bench/train.py's curve: per size, the better of the cold and warm versions' served share."""
    report = json.loads(path.read_text())
    points = []
    for row in report["curve"]:
        shares = [run["test"]["served_share"] for run in (row.get("cold"), row.get("warm")) if run]
        points.append((int(row["examples"]), max(shares)))
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--curve", type=parse_curve, help="answers:served_share,... (bench/train.py's served_share)")
    source.add_argument("--train-json", type=Path, help="bench/train.py --out's JSON")
    parser.add_argument("--final", type=float, default=None,
                        help="also: the share rising linearly from the last point to this at --requests answers")
    parser.add_argument("--requests", type=int, default=DEMO_REQUESTS)
    parser.add_argument("--oos-rate", type=float, default=DEMO_OOS_RATE)
    parser.add_argument("--shadow-rate", type=float, default=SHADOW_RATE)
    args = parser.parse_args(argv)
    curve = args.curve or curve_from_train_json(args.train_json)
    options = {"requests": args.requests, "oos_rate": args.oos_rate, "shadow_rate": args.shadow_rate}
    report: dict[str, Any] = {"benchmark": "cost_bound", "goal": COST_GOAL, "curve": curve, **options,
                              "measured_curve": whole_stream_cost(curve, **options)}
    if args.final is not None:
        rising = [*curve, (max(args.requests, curve[-1][0] + 1), args.final)]
        report["rising_to_final"] = whole_stream_cost(rising, **options)
    report["every_in_scope_request_from_the_last_point"] = whole_stream_cost(
        [*curve[:-1], (curve[-1][0], 1.0)], **options)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
