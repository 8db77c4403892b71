"""bench/report.py runs end to end on a small seeded store and reports every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_report_bench_small() -> None:
    result = subprocess.run([sys.executable, "bench/report.py", "--rows", "3000", "--insert-sample", "300",
                             "--body-bytes", "10"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    out = json.loads(result.stdout)
    assert set(out["insert_rows_per_s"]) == {"all_tiers", "no_score_rollups", "minute_only", "no_rollups"}
    for prefix in ("request_rollups", "score_rollups", "shadow_rollups"):
        rows = out["rollup_rows"]
        assert rows[prefix] >= rows[f"{prefix}_hourly"] >= rows[f"{prefix}_daily"] > 0, prefix
    assert out["rows_found"] == {"requests": 3000, "shadow_results": 300}
    for window in ("24h", "7d", "all"):
        assert all(value > 0 for value in out[window].values()), window
        assert out[window]["calibration_curve_equal"] is True, window


def test_report_bench_sql_seed() -> None:
    """The 10M-row seeding path (SQLite generates the rows, the tiers are filled by SQL): its
    buckets agree with the writer's and the curve from its rollups equals the raw one."""
    result = subprocess.run([sys.executable, "bench/report.py", "--rows", "20000", "--insert-sample", "0",
                             "--body-bytes", "10", "--seed", "sql", "--old-windows", "24h"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    out = json.loads(result.stdout)
    assert out["sql_bucket_mismatches"] == 0 and out["rows_found"] == {"requests": 20000, "shadow_results": 2000}
    assert "old_report_ms" in out["24h"] and "old_report_ms" not in out["all"]
    assert all(out[window]["calibration_curve_equal"] is True for window in ("24h", "7d", "all"))


@pytest.mark.integration  # a PostgreSQL server (the session fixture), as the store tests' postgres cases
def test_report_bench_sql_seed_postgres(postgres_dsn: str) -> None:
    """The PostgreSQL seeding path (the server generates the rows, the tiers are filled by the
    migrations' SQL): its buckets agree with the writer's, the curve from its rollups equals the
    raw one, and the request tiers hold every row."""
    result = subprocess.run([sys.executable, "bench/report.py", "--rows", "20000", "--insert-sample", "0",
                             "--body-bytes", "10", "--seed", "sql", "--old-windows", "24h", "--dsn", postgres_dsn],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    out = json.loads(result.stdout)
    assert out["backend"] == "postgres" and out["sql_bucket_mismatches"] == 0
    assert out["rows_found"] == {"requests": 20000, "shadow_results": 2000}
    assert all(out[window]["calibration_curve_equal"] is True for window in ("24h", "7d", "all"))
    from core.store.postgres import PostgresStore

    store = PostgresStore(postgres_dsn)
    try:
        for table in ("request_rollups", "request_rollups_hourly", "request_rollups_daily"):
            assert store.query(f"select sum(requests) as n from {table}")[0]["n"] == 20000, table
        for table in ("shadow_rollups", "shadow_rollups_daily", "score_rollups_daily"):
            assert store.query(f"select sum(comparisons) as n from {table}")[0]["n"] == 2000, table
    finally:
        store.close()
