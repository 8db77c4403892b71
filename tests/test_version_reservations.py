"""Concurrent training runs (a manual ``train`` beside a scheduled one) never take the same
version number; a crashed run's number is taken again by the rerun (it resumes its checkpoint)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from core.registry import CandidateVersion, Registry
from core.store import SQLiteStore

ROOT = Path(__file__).resolve().parents[1]
ROUTE = "clinc-intents"

RESERVE_AND_HOLD = textwrap.dedent("""
    import sys, time
    from core.registry import Registry
    from core.store import SQLiteStore
    store = SQLiteStore(sys.argv[1])
    print(Registry(store).next_version(sys.argv[2]), flush=True)
    sys.stdin.read()  # hold the reservation until told to go
""")


def _reserving_process(db: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", RESERVE_AND_HOLD, str(db), ROUTE], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_concurrent_runs_in_separate_processes_get_distinct_versions(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"
    store = SQLiteStore(db)
    Registry(store).record(CandidateVersion(ROUTE, "v3", "live", "/a/v3"))
    processes = [_reserving_process(db) for _ in range(4)]
    try:
        versions = [process.stdout.readline().strip() for process in processes]  # type: ignore[union-attr]
    finally:
        for process in processes:
            process.communicate("")
    assert sorted(versions) == ["v4", "v5", "v6", "v7"]
    # The holders exited without recording a version: their numbers are free again.
    assert Registry(store).next_version(ROUTE) == "v4"
    store.close()


def test_one_process_reserving_again_keeps_its_number_and_recorded_versions_count(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "db.sqlite")
    registry = Registry(store)
    assert registry.next_version(ROUTE) == "v1"
    assert registry.next_version(ROUTE) == "v1", "a run that produced nothing leaves its number to the next"
    registry.record(CandidateVersion(ROUTE, "v1", "rejected", "/a/v1"))
    assert registry.next_version(ROUTE) == "v2"
    assert registry.next_version("other-route") == "v1"
    store.close()
