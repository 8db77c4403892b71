"""`distillgate demo --quick` end to end (real gateway, vLLM, replay teacher, trainer):
its report must be internally consistent — not tuned to any threshold."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    completed = subprocess.run([sys.executable, "-m", "cli.main", "demo", "--quick", "--out", str(out)],
                               cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert completed.returncode == 0, (completed.stdout[-3000:], completed.stderr[-3000:])
    return out


def test_report_counts_add_up(demo_out: Path) -> None:
    report = json.loads((demo_out / "report.json").read_text())
    overall, phases = report["overall"], report["phases"]
    assert overall["requests"] == report["options"]["requests"]
    assert overall["failed_requests"] == 0
    assert sum(phase["requests"] for phase in phases) == overall["requests"]
    assert sum(phase["failed_requests"] for phase in phases) == 0
    assert sum(phase["cost_usd"] for phase in phases) == pytest.approx(overall["cost_usd"], rel=1e-6, abs=1e-9)
    assert sum(phase["all_teacher_cost_usd"] for phase in phases) == pytest.approx(overall["all_teacher_cost_usd"])
    assert 0 < overall["cost_usd"] <= overall["cost_usd_with_shadow"]
    assert overall["all_teacher_cost_usd"] > 0
    for share in ("student_share", "accuracy", "all_teacher_accuracy", "oos_sent_to_teacher"):
        assert 0 <= overall[share] <= 1
    assert report["heldout"]["queries"] == report["options"]["heldout_limit"]
    assert set(report["goals"]) and all(isinstance(goal["met"], bool) for goal in report["goals"].values())
    assert (demo_out / "savings.png").stat().st_size > 10_000
    assert all(version["status"] in {"candidate", "live", "retired", "rejected", "failed"}
               for version in report["versions"])


def test_student_requests_cost_less_than_teacher_requests(demo_out: Path) -> None:
    with sqlite3.connect(demo_out / "distillgate.db") as connection:
        averages = dict(connection.execute(
            "select target, avg(cost_usd) from requests where status_code = 200 group by target"))
        rows = connection.execute("select count(*) from requests").fetchone()[0]
    report = json.loads((demo_out / "report.json").read_text())
    assert rows == report["overall"]["requests"] + report["heldout"]["queries"]
    assert averages["teacher"] > 0
    if "student" in averages:
        assert averages["student"] < averages["teacher"]
