"""The store and its batched writer: migrations, flush on close, back-pressure, retries."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from core.store import BatchWriter, SQLiteStore
from core.store.migrations import MIGRATIONS
from tests.helpers import row


def test_migrations_apply_once_and_are_recorded(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    store.close()
    store = SQLiteStore(tmp_path / "s.db")
    names = [r["name"] for r in store.query("select name from _migrations order by name")]
    assert names == [migration.__name__ for migration in MIGRATIONS]
    assert store.query("pragma journal_mode")[0]["journal_mode"] == "wal"


async def test_writer_flushes_everything_on_close(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    writer = BatchWriter(store.insert_requests, batch_size=7, flush_interval_s=0.01)
    writer.start()
    for index in range(100):
        await writer.log(row(index))
    await writer.close()
    assert store.count_requests() == 100 and writer.rows_written == 100


async def test_full_queue_applies_back_pressure_instead_of_dropping(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    writer = BatchWriter(store.insert_requests, batch_size=2, queue_max=3)
    blocked = asyncio.Event()

    async def produce() -> None:
        for index in range(10):
            await writer.log(row(index))
        blocked.set()

    producer = asyncio.create_task(produce())
    await asyncio.sleep(0.05)
    assert not blocked.is_set() and writer.pending == 3  # waiting for room: nothing dropped
    writer.start()
    await asyncio.wait_for(producer, 5)
    await writer.close()
    assert store.count_requests() == 10


async def test_failed_writes_are_retried_until_they_succeed(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    failures = {"left": 3}

    def flaky(rows: list[dict[str, Any]]) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise sqlite3.OperationalError("database is locked")
        store.insert_requests(rows)

    writer = BatchWriter(flaky, retry_backoff_s=0.001)
    writer.start()
    await writer.log(row(1))
    await writer.close()
    assert store.count_requests() == 1 and writer.write_errors == 3 and writer.healthy


def test_live_version_switch_is_atomic(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    for version in ("v1", "v2"):
        store.upsert_version({"route": "r", "version": version, "status": "candidate", "created_at": 1.0})
    store.set_live_version("r", "v1")
    store.set_live_version("r", "v2")
    assert store.live_version("r")["version"] == "v2"
    assert {v["version"]: v["status"] for v in store.versions("r")} == {"v1": "retired", "v2": "live"}
    with pytest.raises(KeyError):
        store.set_live_version("r", "v9")
    assert store.live_version("r")["version"] == "v2"  # the failed switch rolled back
