"""The retraining schedule: trains in a child process when enough new data arrived, then promotes."""

from __future__ import annotations

import asyncio
import json
import stat
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from core.config import parse_settings
from core.store import SQLiteStore
from gateway.training.schedule import TrainingScheduler, start_training_scheduler
from gateway.training.swap import SwapResult
from tests.fixtures_postgres import StoreBackend
from trainer.seed import seed_teacher_answers

ROUTE = "intents"


class FakeSwapper:
    def __init__(self) -> None:
        self.promoted: list[tuple[str, str]] = []

    async def promote(self, route: str, version: str, *, force: bool = False) -> SwapResult:
        self.promoted.append((route, version))
        return SwapResult(route, version, None, 1.0, 1.0, 1.0, True, None)


def fake_python(tmp_path: Path, answer: dict[str, Any] | None, exit_code: int = 0) -> Path:
    """Stands in for ``python -m cli.main train``: records its argv, prints the candidate."""
    script = tmp_path / "fake-python"
    printed = f"echo '{json.dumps(answer)}'" if answer else "echo 'boom' >&2"
    script.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'argv'}\necho 'progress...'\n{printed}\nexit {exit_code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


@pytest.fixture
def parts(tmp_path: Path) -> tuple[Any, SQLiteStore, FakeSwapper]:
    settings = parse_settings({"store": {"path": str(tmp_path / "db.sqlite")},
                               "routes": [{"name": ROUTE, "teacher": {"model": "openai/x"},
                                           "training": {"min_new_examples": 5, "interval_minutes": 0.01}}]})
    return settings, SQLiteStore(settings.store.path), FakeSwapper()


async def test_waits_for_enough_new_examples_then_trains_and_promotes(parts: Any, tmp_path: Path) -> None:
    settings, store, swapper = parts
    python = fake_python(tmp_path, {"version": "v1", "status": "candidate"})
    scheduler = TrainingScheduler(settings, store, swapper, config_path="c.yaml", python=str(python))
    seed_teacher_answers(store, ROUTE, [("hello", "greeting")] * 3)
    assert (await scheduler.tick(ROUTE))["action"] == "waiting"
    seed_teacher_answers(store, ROUTE, [(f"hi {index}", "greeting") for index in range(5)])
    outcome = await scheduler.tick(ROUTE)
    assert outcome == {"action": "promoted", "version": "v1", "previous": None}
    assert swapper.promoted == [(ROUTE, "v1")]
    argv = (tmp_path / "argv").read_text().split()
    assert argv[:4] == ["-m", "cli.main", "train", "--config"] and "--json" in argv

    # A finished run resets the count: only examples logged after it are new.
    store.record_training_run({"route": ROUTE, "started_at": 1e12, "finished_at": 1e12, "outcome": "candidate",
                               "version": "v1", "detail_json": "{}"})
    assert scheduler.new_examples(ROUTE) == 0


async def test_rejected_or_failed_training_promotes_nothing(parts: Any, tmp_path: Path) -> None:
    settings, store, swapper = parts
    seed_teacher_answers(store, ROUTE, [(f"hi {index}", "greeting") for index in range(6)])
    rejected = fake_python(tmp_path, {"version": "v1", "status": "rejected", "note": "worse than live"})
    scheduler = TrainingScheduler(settings, store, swapper, config_path="c.yaml", python=str(rejected))
    assert (await scheduler.tick(ROUTE))["action"] == "rejected"
    failing = fake_python(tmp_path, None, exit_code=1)
    scheduler.python = str(failing)
    assert (await scheduler.tick(ROUTE))["action"] == "train_failed"
    assert swapper.promoted == []


async def test_scheduler_starts_and_stops_in_the_event_loop(parts: Any, tmp_path: Path) -> None:
    settings, store, swapper = parts
    scheduler = start_training_scheduler(settings, store, swapper, config_path="c.yaml",
                                         python=str(fake_python(tmp_path, None)))
    job = scheduler.scheduler.get_job(f"train:{ROUTE}")
    assert job.max_instances == 1 and job.coalesce
    await asyncio.sleep(0.8)  # the 0.6 s interval fires once: too few examples, so it waits
    await scheduler.shutdown()
    assert scheduler.last_outcome[ROUTE]["action"] == "waiting"


class NoRowReads(SQLiteStore):
    """A store that fails the test if anyone loads request or shadow rows to count them."""

    def iter_requests(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the scheduler loaded every row to count them")

    def iter_shadow_results(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the scheduler loaded every row to count them")


def test_new_examples_are_counted_by_a_query_not_by_loading_rows(tmp_path: Path) -> None:
    settings = parse_settings({"store": {"path": str(tmp_path / "db.sqlite")},
                               "routes": [{"name": ROUTE, "teacher": {"model": "openai/x"}}]})
    store = NoRowReads(settings.store.path)
    base = {"route": ROUTE, "request_json": "x" * 10_000, "train_trusted": 1}
    store.insert_requests(
        [{**base, "id": f"t{index}", "created_at": 100.0 + index, "target": "teacher", "status_code": 200}
         for index in range(40)]
        + [{**base, "id": f"s{index}", "created_at": 119.0, "target": "student", "status_code": 200}
           for index in range(4)]
        + [{**base, "id": "old", "created_at": 5.0, "target": "teacher", "status_code": 200},
           {**base, "id": "failed", "created_at": 150.0, "target": "teacher", "status_code": 502},
           {**base, "id": "student", "created_at": 150.0, "target": "student", "status_code": 200},
           {**base, "id": "other", "created_at": 150.0, "target": "teacher", "status_code": 200, "route": "other"},
           # A key not trusted for training: its answers never become training data, nor a trigger.
           {**base, "id": "untrusted", "created_at": 150.0, "target": "teacher", "status_code": 200,
            "train_trusted": 0}])
    store.insert_shadow_results([{"request_id": f"s{index}", "created_at": 120.0, "route": ROUTE}
                                 for index in range(3)]
                                + [{"request_id": "untrusted", "created_at": 120.0, "route": ROUTE}])
    store.record_training_run({"route": ROUTE, "started_at": 10.0, "finished_at": 11.0, "outcome": "candidate",
                               "version": "v1", "detail_json": "{}"})
    scheduler = TrainingScheduler(settings, store, FakeSwapper(), config_path="c.yaml")
    assert scheduler.new_examples(ROUTE) == 43
    assert store.count_new_examples(ROUTE, after=119.5) == 20 + 3


# -- drift starts a cycle early -------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def drift_parts(tmp_path: Path, interval_minutes: float = 0.01) -> tuple[Any, SQLiteStore, Any, Any, Clock]:
    """A route that retrains at 5 new answers, or at 2 while more than half of its last 10
    scored requests are above its threshold."""
    from gateway.route_table import RouteTable, StudentPointer
    from gateway.training.drift import DriftWatch
    from tests.test_drift import WindowRouter

    settings = parse_settings({"store": {"path": str(tmp_path / "db.sqlite")}, "routes": [{
        "name": ROUTE, "teacher": {"model": "openai/x"}, "ood_threshold": 0.5,
        "training": {"min_new_examples": 5, "interval_minutes": interval_minutes},
        "drift": {"window": 10, "min_requests": 10, "max_ood_share": 0.5, "min_new_examples": 2,
                  "cooldown_minutes": 30}}]})
    store = SQLiteStore(settings.store.path)
    routes = RouteTable(settings, store)
    routes.switch_student(ROUTE, StudentPointer("v0", f"{ROUTE}@v0"))
    router, clock = WindowRouter(), Clock()
    return settings, store, router, DriftWatch(settings, routes, router, store, clock=clock), clock


def far_off_traffic(router: Any, requests: int = 10) -> None:
    for _ in range(requests):
        router.drift.record(ROUTE, "v0", 0.9)


async def test_drift_starts_a_cycle_with_fewer_new_answers_then_cools_down(tmp_path: Path) -> None:
    settings, store, router, drift, clock = drift_parts(tmp_path)
    python = fake_python(tmp_path, {"version": "v1", "status": "candidate"})
    swapper = FakeSwapper()
    scheduler = TrainingScheduler(settings, store, swapper, config_path="c.yaml", python=str(python), drift=drift)
    seed_teacher_answers(store, ROUTE, [(f"hi {index}", "greeting") for index in range(3)])
    assert (await scheduler.tick(ROUTE))["action"] == "waiting"  # 3 < 5, and no drift yet

    far_off_traffic(router)
    outcome = await scheduler.tick(ROUTE)
    assert outcome["action"] == "promoted" and outcome["trigger"] == "drift"
    assert "ood_share 1.000 > max_ood_share 0.500" in outcome["drift"]
    assert swapper.promoted == [(ROUTE, "v1")] and drift.retrains[ROUTE] == 1
    [audited] = [row for row in store.route_audit(ROUTE) if row["field"] == "drift_retrain"]
    assert json.loads(audited["new_json"])["new_examples"] == 3

    # Still drifting (the fake promotion changed no pointer) and 3 new answers: the cooldown holds.
    run_at = time.time() + 10
    store.record_training_run({"route": ROUTE, "started_at": run_at, "finished_at": run_at, "outcome": "candidate",
                               "version": "v1", "detail_json": "{}"})
    seed_teacher_answers(store, ROUTE, [(f"hey {index}", "greeting") for index in range(3)], start_at=run_at + 1)
    assert (await scheduler.tick(ROUTE)) == {"action": "waiting", "new_examples": 3}
    clock.now += 31 * 60
    assert (await scheduler.tick(ROUTE))["action"] == "waiting"  # and no fresh window of evidence since
    far_off_traffic(router)
    assert (await scheduler.tick(ROUTE))["trigger"] == "drift"
    assert drift.retrains[ROUTE] == 2


async def test_drift_below_its_floor_of_new_answers_waits(tmp_path: Path) -> None:
    settings, store, router, drift, _ = drift_parts(tmp_path)
    scheduler = TrainingScheduler(settings, store, FakeSwapper(), config_path="c.yaml",
                                  python=str(fake_python(tmp_path, None)), drift=drift)
    seed_teacher_answers(store, ROUTE, [("hello", "greeting")])
    far_off_traffic(router)
    assert await scheduler.tick(ROUTE) == {"action": "waiting", "new_examples": 1}
    assert drift.retrains[ROUTE] == 0


async def test_the_drift_check_brings_the_routes_tick_forward(tmp_path: Path) -> None:
    settings, store, router, drift, _ = drift_parts(tmp_path, interval_minutes=60)
    python = fake_python(tmp_path, {"version": "v1", "status": "candidate"})
    scheduler = start_training_scheduler(settings, store, FakeSwapper(), config_path="c.yaml", python=str(python),
                                         drift=drift)
    try:
        assert scheduler.scheduler.get_job("drift") is not None
        seed_teacher_answers(store, ROUTE, [(f"hi {index}", "greeting") for index in range(3)])
        assert await scheduler.check_drift() == []  # enough answers for a drift cycle, but no drift
        far_off_traffic(router)
        assert await scheduler.check_drift() == [ROUTE]
        for _ in range(100):  # the hourly tick runs now instead of in an hour
            if ROUTE in scheduler.last_outcome:
                break
            await asyncio.sleep(0.05)
    finally:
        await scheduler.shutdown()
    assert scheduler.last_outcome[ROUTE]["trigger"] == "drift"


async def test_no_drift_job_without_a_drift_trigger(parts: Any, tmp_path: Path) -> None:
    from gateway.route_table import RouteTable
    from gateway.training.drift import DriftWatch
    from tests.test_drift import WindowRouter

    settings, store, swapper = parts
    drift = DriftWatch(settings, RouteTable(settings, store), WindowRouter(), store)
    scheduler = start_training_scheduler(settings, store, swapper, config_path="c.yaml", drift=drift)
    try:
        assert scheduler.scheduler.get_job("drift") is None  # tracked only: nothing to check
    finally:
        await scheduler.shutdown()


async def test_only_the_replica_holding_the_lock_schedules(store_backend: StoreBackend, tmp_path: Path) -> None:
    """Two schedulers on one store: on PostgreSQL one trains and the other stands by until the
    first lets go; on SQLite (one machine's store) each schedules, as before."""
    settings = parse_settings({"store": {"path": str(tmp_path / "db.sqlite")},
                               "routes": [{"name": ROUTE, "teacher": {"model": "openai/x"},
                                           "training": {"min_new_examples": 5}}]})
    python = fake_python(tmp_path, {"version": "v1", "status": "rejected"})
    first, second = (TrainingScheduler(settings, store_backend.open(), FakeSwapper(), config_path="c.yaml",
                                       python=str(python)) for _ in range(2))
    seed_teacher_answers(first.store, ROUTE, [(f"hi {index}", "greeting") for index in range(6)])
    actions = [(await scheduler.tick(ROUTE))["action"] for scheduler in (first, second)]
    if store_backend.kind == "sqlite":
        assert actions == ["rejected", "rejected"]
        return
    assert actions == ["rejected", "standby"] and (first.leader, second.leader) == (True, False)
    await first.shutdown()  # gives the lock up
    assert (await second.tick(ROUTE))["action"] == "rejected" and second.leader
    await second.shutdown()


class FakeCanaries:
    def __init__(self, live: bool) -> None:
        self.live = live
        self.begun: list[tuple[str, str]] = []

    def has_live(self, route: str) -> bool:
        return self.live

    def active(self, route: str) -> Any:
        return SimpleNamespace(version=self.begun[-1][1]) if self.begun else None

    async def begin(self, route: str, version: str) -> None:
        self.begun.append((route, version))


@pytest.mark.parametrize("live", [True, False])
async def test_a_canary_route_starts_a_canary_instead_of_promoting(tmp_path: Path, live: bool) -> None:
    """With rollout.canary_share the candidate serves its share first (the first version, with
    nothing to compare it with, goes live at once); no cycle runs while a canary does."""
    settings = parse_settings({"store": {"path": str(tmp_path / "db.sqlite")},
                               "routes": [{"name": ROUTE, "teacher": {"model": "openai/x"},
                                           "rollout": {"canary_share": 0.1},
                                           "training": {"min_new_examples": 5, "interval_minutes": 0.01}}]})
    store, swapper, canaries = SQLiteStore(settings.store.path), FakeSwapper(), FakeCanaries(live)
    python = fake_python(tmp_path, {"version": "v2", "status": "candidate"})
    scheduler = TrainingScheduler(settings, store, swapper, config_path="c.yaml", python=str(python),
                                  canaries=canaries)  # type: ignore[arg-type]
    seed_teacher_answers(store, ROUTE, [(f"hi {index}", "greeting") for index in range(5)])
    outcome = await scheduler.tick(ROUTE)
    if not live:
        assert outcome["action"] == "promoted" and swapper.promoted == [(ROUTE, "v2")] and canaries.begun == []
        return
    assert outcome == {"action": "canary", "version": "v2", "share": 0.1}
    assert canaries.begun == [(ROUTE, "v2")] and swapper.promoted == []
    assert await scheduler.tick(ROUTE) == {"action": "canary_running", "version": "v2"}
