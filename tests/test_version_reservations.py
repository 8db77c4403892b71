"""Concurrent training runs (a manual ``train`` beside a scheduled one) never take the same
version number; a crashed run's number is taken again by the rerun (it resumes its checkpoint)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from core.registry import CandidateVersion, Registry
from tests.fixtures_postgres import StoreBackend

ROOT = Path(__file__).resolve().parents[1]
ROUTE = "clinc-intents"

RESERVE_AND_HOLD = textwrap.dedent("""
    import sys, time
    from core.registry import Registry
    if sys.argv[1] == "sqlite":
        from core.store import SQLiteStore
        store = SQLiteStore(sys.argv[3])
    else:
        from core.store.postgres import PostgresStore
        store = PostgresStore(sys.argv[3])
    print(Registry(store).next_version(sys.argv[2]), flush=True)
    sys.stdin.read()  # hold the reservation until told to go
""")


def _reserving_process(kind: str, target: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", RESERVE_AND_HOLD, kind, ROUTE, target], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_concurrent_runs_in_separate_processes_get_distinct_versions(store_backend: StoreBackend,
                                                                     tmp_path: Path) -> None:
    store = store_backend.open()
    target = store_backend.dsn or str(tmp_path / "s.db")
    Registry(store).record(CandidateVersion(ROUTE, "v3", "live", "/a/v3"))
    processes = [_reserving_process(store_backend.kind, target) for _ in range(4)]
    try:
        versions = [process.stdout.readline().strip() for process in processes]  # type: ignore[union-attr]
    finally:
        for process in processes:
            process.communicate("")
    assert sorted(versions) == ["v4", "v5", "v6", "v7"]
    # The holders exited without recording a version: their numbers are free again.
    assert Registry(store).next_version(ROUTE) == "v4"


def test_one_process_reserving_again_keeps_its_number_and_recorded_versions_count(
        store_backend: StoreBackend) -> None:
    store = store_backend.open()
    registry = Registry(store)
    assert registry.next_version(ROUTE) == "v1"
    assert registry.next_version(ROUTE) == "v1", "a run that produced nothing leaves its number to the next"
    registry.record(CandidateVersion(ROUTE, "v1", "rejected", "/a/v1"))
    assert registry.next_version(ROUTE) == "v2"
    assert registry.next_version("other-route") == "v1"
