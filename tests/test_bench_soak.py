"""Smoke test of bench/soak.py: a short soak against the session's real vLLM, through a real
``distillgate serve`` and the replay teacher; no unexplained error, one log row per request."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_soak_quick_run(vllm_server: Any, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    completed = subprocess.run(
        [sys.executable, "bench/soak.py", "--quick", "--vllm-url", vllm_server.url, "--concurrency", "3",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )
    assert completed.returncode == 0, (completed.stdout[-3000:], completed.stderr[-3000:])
    report = json.loads(out.read_text())
    assert report["unexplained_errors"] == 0 and report["rows_match"]
    assert report["acknowledged"] > 20 and report["expected_errors"] > 0
    assert report["statuses"].keys() >= {"200", "400", "404"}
    assert report["p99_ms"] >= report["p50_ms"] > 0
