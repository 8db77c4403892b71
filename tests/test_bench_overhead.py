"""Smoke test of bench/overhead.py: it runs end to end and prints comparable JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_overhead_benchmark_prints_side_by_side_json() -> None:
    completed = subprocess.run(
        [sys.executable, "bench/overhead.py", "--requests", "10", "--concurrency", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout)
    for name in ("direct", "gateway_student", "gateway_teacher", "gateway_teacher_litellm", "gateway_auto",
                 "litellm_proxy"):
        measured = report["results"][name]["2"]
        assert measured["errors"] == 0 and measured["requests"] == 10 and measured["p50_ms"] > 0
    assert report["comparison"]["2"]["gateway_student_throughput_vs_litellm_proxy"] > 0
    assert report["comparison"]["2"]["gateway_auto_throughput_vs_litellm_proxy"] > 0
    assert report["embedder"] == "static"
    probe = report["results"]["auto_probe"]
    assert probe["status"] == 200 and probe["target"] == "student" and float(probe["ood_score"]) >= 0


@pytest.mark.integration
def test_overhead_benchmark_puts_the_teacher_clients_side_by_side() -> None:
    completed = subprocess.run(
        [sys.executable, "bench/overhead.py", "--requests", "10", "--concurrency", "2",
         "--paths", "gateway_teacher", "gateway_teacher_litellm"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout)
    assert set(report["results"]) == {"direct", "gateway_teacher", "gateway_teacher_litellm"}
    for name in report["results"]:
        assert report["results"][name]["2"]["errors"] == 0
    row = report["comparison"]["2"]
    assert row["teacher_httpx_vs_litellm_throughput"] > 0 and "gateway_teacher_added_p50_ms" in row


@pytest.mark.integration
def test_overhead_benchmark_measures_the_auto_path_with_the_chosen_detector() -> None:
    completed = subprocess.run(
        [sys.executable, "bench/overhead.py", "--requests", "10", "--concurrency", "2",
         "--paths", "gateway_auto", "--detector", "knn_tuned"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout)
    assert report["detector"] == "knn_tuned" and set(report["results"]) == {"direct", "gateway_auto", "auto_probe"}
    assert report["results"]["gateway_auto"]["2"]["errors"] == 0
    probe = report["results"]["auto_probe"]
    assert probe["status"] == 200 and probe["target"] == "student" and float(probe["ood_score"]) >= 0
