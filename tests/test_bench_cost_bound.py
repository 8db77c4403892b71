"""bench/cost_bound.py: the whole-stream cost an ideal loop reaches with a given learning curve."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cost_bound import parse_curve, whole_stream_cost

ROOT = Path(__file__).resolve().parents[1]


def test_a_student_that_serves_nothing_costs_all_teacher() -> None:
    bound = whole_stream_cost([(1000, 0.0), (5000, 0.0)], requests=2000)
    assert bound["cost_vs_all_teacher"] == 1.0 and bound["first_request_served_by_student"] is None
    assert bound["training_answers_at_end"] == 2000


def test_a_student_serving_every_in_scope_request_at_once_pays_for_oos_and_shadow_calls_only() -> None:
    bound = whole_stream_cost([(0, 1.0)], requests=1000, oos_rate=0.1, shadow_rate=0.05)
    assert bound["cost_vs_all_teacher"] == pytest.approx(0.1 + 0.9 * 0.05, abs=1e-4)
    assert bound["in_scope_student_share"] == 1.0


def test_answers_the_student_serves_teach_it_nothing_but_their_shadow_calls() -> None:
    slow = whole_stream_cost([(1000, 0.3), (3000, 0.6)], requests=5000)
    fast = whole_stream_cost([(1000, 0.6), (3000, 0.9)], requests=5000)
    assert fast["cost_vs_all_teacher"] < slow["cost_vs_all_teacher"]
    # The better student serves more, so fewer answers come back to train on.
    assert fast["training_answers_at_end"] < slow["training_answers_at_end"]
    # Without shadow calls the training data is exactly what the teacher answered.
    unshadowed = whole_stream_cost([(1000, 0.6)], requests=3000, shadow_rate=0.0)
    assert unshadowed["training_answers_at_end"] == round(unshadowed["cost_vs_all_teacher"] * 3000)


def test_a_curve_must_rise_in_answers_and_hold_shares() -> None:
    assert parse_curve("1000:0.3,2000:0.5") == [(1000, 0.3), (2000, 0.5)]
    for bad in ("2000:0.5,1000:0.3", "1000:1.5"):
        with pytest.raises(SystemExit):
            parse_curve(bad)


def test_the_cli_reads_bench_train_json_taking_the_better_of_cold_and_warm(tmp_path: Path) -> None:
    train = {"curve": [{"examples": 1000, "cold": {"test": {"served_share": 0.3}}},
                       {"examples": 2000, "cold": {"test": {"served_share": 0.5}}, "warm": {"test": {"served_share": 0.6}}}]}
    (tmp_path / "train.json").write_text(json.dumps(train))
    completed = subprocess.run([sys.executable, "bench/cost_bound.py", "--train-json", str(tmp_path / "train.json"),
                                "--requests", "3000"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert report["curve"] == [[1000, 0.3], [2000, 0.6]]
    assert report["measured_curve"] == whole_stream_cost([(1000, 0.3), (2000, 0.6)], requests=3000)
    assert (report["every_in_scope_request_from_the_last_point"]["cost_vs_all_teacher"]
            < report["measured_curve"]["cost_vs_all_teacher"])
