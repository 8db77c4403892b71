"""bench/report.py runs end to end on a small seeded store and reports every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_report_bench_small() -> None:
    result = subprocess.run([sys.executable, "bench/report.py", "--rows", "3000", "--insert-sample", "300",
                             "--body-bytes", "10"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    out = json.loads(result.stdout)
    assert set(out["insert_rows_per_s"]) == {"all_tiers", "minute_only", "no_rollups"}
    assert out["rollup_rows"]["minute"] >= out["rollup_rows"]["hour"] >= out["rollup_rows"]["day"] > 0
    for window in ("24h", "7d", "all"):
        assert all(value > 0 for value in out[window].values()), window
