"""Smoke test of bench/stream_ttft.py: it runs end to end and each configuration is served
by whom it should be (the quick run uses a replay student, no vLLM)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_stream_ttft_benchmark_prints_json_per_configuration() -> None:
    completed = subprocess.run([sys.executable, "bench/stream_ttft.py", "--quick"], cwd=ROOT, capture_output=True,
                               text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout)
    served = {name: result["served_by"] for name, result in report["results"].items()}
    assert served == {"teacher": {"teacher": 5}, "student_stream": {"student": 5}, "cascade_sure": {"student": 5},
                      "cascade_unsure": {"teacher": 5}}
    assert all(result["ttft_p50_ms"] > 0 for result in report["results"].values())
    assert set(report["comparison"]) == {"cascade_sure_ttft_minus_teacher_ttft_ms",
                                         "cascade_sure_ttft_minus_student_stream_ttft_ms",
                                         "cascade_unsure_ttft_minus_teacher_ttft_ms"}
