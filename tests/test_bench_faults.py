"""Smoke test of bench/faults.py: each fault against a real ``distillgate serve`` with its own
vLLM and replay teacher; the client saw what the README's fault table says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_faults_run(student_base_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "faults.json"
    completed = subprocess.run(
        [sys.executable, "bench/faults.py", "--base-dir", str(student_base_dir), "--hang-s", "4", "--lock-s", "3",
         "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1500, check=False)
    assert completed.returncode == 0, (completed.stdout[-3000:], completed.stderr[-3000:])
    print(out.read_text())
    faults = {fault["fault"].split(" (")[0]: fault for fault in json.loads(out.read_text())["faults"]}
    killed = faults["vLLM SIGKILL"]
    assert set(killed["statuses"]) == {"200"} and killed["served_by"].get("student") == 1
    assert killed["restarts"] == 1
    assert set(faults["vLLM hung"]["statuses"]) == {"200"}
    too_long = faults["prompt longer than the student's max_model_len"]
    assert too_long["served_by"] == {"teacher": 5} and too_long["breaker"] == "closed"
    assert faults["admin PATCH ood_threshold null"]["patch_status"] == 400
    assert faults["admin PATCH ood_threshold null"]["statuses"] == {"200": 3}
    locked = next(fault for name, fault in faults.items() if name.startswith("database locked"))
    assert set(locked["statuses"]) == {"200"} and locked["readyz_while_locked"] == 503
    teacher = faults["teacher killed"]
    assert teacher["teacher_route"]["statuses"] == {"502": 3} and teacher["student_route"]["served_by"] == {"student": 3}
