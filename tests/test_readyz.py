"""``/readyz`` under a locked database: it answers fast, never holds the store's lock (other
requests reading the store are not held up), and shows error text only to the admin."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from core.config import Settings
from gateway.app import create_app
from tests.helpers import UvicornThread

ADMIN = {"authorization": "Bearer admin-secret"}


def test_readyz_on_a_locked_store_is_fast_and_holds_no_lock(make_settings: Callable[..., Settings],
                                                            replay_teacher: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLGATE_ADMIN_TOKEN", "admin-secret")
    settings = make_settings(replay_teacher)  # the store's busy timeout: 5 s
    with UvicornThread(create_app(settings)) as server:
        locker = sqlite3.connect(settings.store.path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            timings: dict[str, float] = {}

            def probe() -> None:
                started = time.monotonic()
                timings["status"] = httpx.get(f"{server.url}/readyz", timeout=30).status_code
                timings["readyz_s"] = time.monotonic() - started

            prober = threading.Thread(target=probe)
            prober.start()
            time.sleep(0.1)
            started = time.monotonic()
            versions = httpx.get(f"{server.url}/admin/routes/clinc-intents/versions", headers=ADMIN, timeout=30)
            read_s = time.monotonic() - started
            prober.join()
            public = httpx.get(f"{server.url}/readyz").json()["checks"]["store"]
            admin = httpx.get(f"{server.url}/readyz", headers=ADMIN).json()["checks"]["store"]
        finally:
            locker.execute("ROLLBACK")
            locker.close()
    assert timings["status"] == 503 and timings["readyz_s"] < 1.5
    assert versions.status_code == 200 and read_s < 1.0, "a store read waited on the readiness check"
    assert public["ok"] is False and "error" not in public
    assert "locked" in admin["error"]
