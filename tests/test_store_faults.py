"""Store faults: a database locked by another connection, a full disk, a spool that cannot
take a row, a spool left by a crash (the spool's on both back-ends). Requests keep being served, the error shows in
``/readyz`` and ``/metrics``, rows are retried and end up written, never dropped."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.config import Settings
from core.store import BatchWriter, SQLiteStore
from core.store.spool import Spool
from gateway.app import Components, create_app
from tests.fixtures_postgres import StoreBackend
from tests.helpers import MESSAGES, UvicornThread, log_rows, row, sdk
from tests.operators import scrape, total, wait_for

ROUTE = "clinc-intents"
ADMIN = {"authorization": "Bearer admin-secret"}


@pytest.fixture(autouse=True)
def _admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    # /readyz shows error text only to the admin.
    monkeypatch.setenv("DISTILLGATE_ADMIN_TOKEN", "admin-secret")


def serve_while(url: str, count: int) -> list[float]:
    """Send ``count`` requests; their latencies in seconds (each must succeed)."""
    client, latencies = sdk(url), []
    for _ in range(count):
        started = time.monotonic()
        assert client.chat.completions.create(model=ROUTE, messages=MESSAGES).choices[0].message.content == "transfer"
        latencies.append(time.monotonic() - started)
    return latencies


def test_locked_database_keeps_serving_and_shows_in_readyz(make_settings: Callable[..., Settings],
                                                           replay_teacher: str) -> None:
    settings = make_settings(replay_teacher, store={"busy_timeout_ms": 100})
    with UvicornThread(create_app(settings)) as server:
        serve_while(server.url, 1)
        log_rows(settings, 1)
        locker = sqlite3.connect(settings.store.path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            latencies = serve_while(server.url, 8)
            wait_for(lambda: total(scrape(server.url), "distillgate_store_write_errors_total") > 0, timeout_s=5)
            ready = httpx.get(f"{server.url}/readyz", headers=ADMIN, timeout=10)
            assert ready.status_code == 503
            assert "locked" in ready.json()["checks"]["store"]["error"]
            public = httpx.get(f"{server.url}/readyz", timeout=10)
            assert public.status_code == 503 and "error" not in public.json()["checks"]["store"]
            assert total(scrape(server.url), "distillgate_store_writer_healthy", writer="requests") == 0
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert len(log_rows(settings, 9)) == 9, "the queued rows were retried once the lock went"
        wait_for(lambda: httpx.get(f"{server.url}/readyz").status_code == 200, timeout_s=5)
    assert max(latencies) < 2.0


class FullDiskStore(SQLiteStore):
    """The SQLite store, but request writes fail as on a full disk while ``full`` is set."""

    full = True

    def insert_requests(self, rows: list[dict[str, Any]]) -> None:
        if self.full:
            raise sqlite3.OperationalError("database or disk is full")
        super().insert_requests(rows)


def test_full_disk_keeps_serving_and_rows_are_written_when_space_returns(
        make_settings: Callable[..., Settings], replay_teacher: str) -> None:
    settings = make_settings(replay_teacher)
    store = FullDiskStore(settings.store.path)
    with UvicornThread(create_app(settings, Components(store=store))) as server:
        serve_while(server.url, 5)
        wait_for(lambda: httpx.get(f"{server.url}/readyz").status_code == 503, timeout_s=5)
        assert "disk is full" in httpx.get(f"{server.url}/readyz", headers=ADMIN).json()["checks"]["store"]["error"]
        store.full = False
        wait_for(lambda: httpx.get(f"{server.url}/readyz").status_code == 200, timeout_s=10)
    assert store.count_requests() == 5
    store.close()


async def test_spool_append_failure_keeps_the_row_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            store_backend: StoreBackend) -> None:
    store = store_backend.open()
    spool = Spool(tmp_path / "spool")
    writer = BatchWriter(store.insert_requests, flush_interval_s=0.01, spool=spool)
    writer.start()
    real_write = os.write

    def no_space(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", no_space)
    await writer.log(row(1))
    monkeypatch.setattr(os, "write", real_write)
    await writer.log(row(2))
    await writer.close()
    assert store.count_requests() == 2 and spool.append_errors == 1
    assert list((tmp_path / "spool").glob("*.jsonl")) == []


async def test_spool_is_replayed_once_and_torn_lines_are_skipped(tmp_path: Path,
                                                                 store_backend: StoreBackend) -> None:
    store = store_backend.open()
    store.insert_requests([row(1)])  # committed and still spooled: written once
    crashed = tmp_path / "spool" / "000000000007.jsonl"
    crashed.parent.mkdir()
    crashed.write_text("\n".join(json.dumps(row(index)) for index in (1, 2, 3)) + '\n{"id": "r4", "creat')
    spool = Spool(tmp_path / "spool")
    assert spool.recover(store.insert_requests) == 3
    assert store.count_requests() == 3 and not crashed.exists()
    writer = BatchWriter(store.insert_requests, flush_interval_s=0.01, spool=spool)
    writer.start()
    await writer.log(row(5))
    await writer.close()
    assert store.count_requests() == 4
    assert list((tmp_path / "spool").glob("*.jsonl")) == []
