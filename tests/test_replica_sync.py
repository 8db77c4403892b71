"""Replicas on one store behave as one gateway (gateway/training/replica_sync.py): an admin
change or a promotion made through one replica reaches the other by polling the store.

Fast tier: two gateways under uvicorn on one SQLite file, each with its own vLLM stand-in
(so the follower must load the adapter itself); the apply logic on its own. The same through
two ``distillgate serve`` processes on PostgreSQL: tests/test_postgres_replicas.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from core.config import Settings
from core.registry import CandidateVersion, Registry
from core.store import SQLiteStore
from core.upstream import UpstreamFailure
from gateway.app import Components, create_app
from gateway.route_table import RouteTable
from gateway.training.replica_sync import ReplicaSync, read_shared_state
from gateway.training.swap import Swapper
from gateway.upstream.student import VLLMStudent
from tests.helpers import UvicornThread, fake_adapter
from tests.operators import ScoringRouter, _student_reply, wait_for

ROUTE = "clinc-intents"
ADMIN = {"authorization": "Bearer admin-secret"}


class VLLMStandIn:
    """A vLLM stand-in (MockTransport) that remembers the adapters loaded into it."""

    def __init__(self) -> None:
        self.loaded: set[str] = set()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        if request.url.path.endswith("unload_lora_adapter"):
            self.loaded.discard(_lora_name(request))
            return httpx.Response(200, text="ok")
        if request.url.path.endswith("load_lora_adapter"):
            self.loaded.add(_lora_name(request))
            return httpx.Response(200, text="ok")
        return _student_reply(request)


def _lora_name(request: httpx.Request) -> str:
    return str(json.loads(request.content)["lora_name"])


@pytest.fixture
def shared_settings(make_settings: Callable[..., Settings], replay_teacher: str,
                    monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("DISTILLGATE_ADMIN_TOKEN", "admin-secret")
    return make_settings(replay_teacher, store={"sync_interval_s": 0.1})


def _route(url: str) -> dict:
    return httpx.get(f"{url}/admin/routes/{ROUTE}", headers=ADMIN).json()


def test_admin_changes_and_promotions_reach_the_other_replica(shared_settings: Settings, tmp_path: Path) -> None:
    store = SQLiteStore(shared_settings.store.path)
    registry = Registry(store)
    for version in ("v1", "v2"):
        registry.record(CandidateVersion(ROUTE, version, "candidate", fake_adapter(tmp_path / version),
                                         metrics={"candidate": {"confidence_threshold": -0.25}}))
    store.close()
    vllms = [VLLMStandIn(), VLLMStandIn()]
    apps = [create_app(shared_settings, Components(student=VLLMStudent("http://vllm.test",
                                                                       transport=httpx.MockTransport(vllm)),
                                                   router=ScoringRouter()))
            for vllm in vllms]
    with UvicornThread(apps[0]) as a, UvicornThread(apps[1]) as b:
        changed = httpx.patch(f"{a.url}/admin/routes/{ROUTE}", headers=ADMIN,
                              json={"ood_threshold": 0.35, "mode": "teacher_only"})
        assert changed.status_code == 200, changed.text
        wait_for(lambda: _route(b.url)["overrides"] == {"ood_threshold": 0.35, "mode": "teacher_only"}, timeout_s=5)
        assert (_route(b.url)["ood_threshold"], _route(b.url)["mode"]) == (0.35, "teacher_only")

        promoted = httpx.post(f"{a.url}/admin/routes/{ROUTE}/promote", headers=ADMIN, json={"version": "v1"})
        assert promoted.status_code == 200, promoted.text
        wait_for(lambda: _route(b.url)["student_version"] == "v1", timeout_s=5)
        assert vllms[1].loaded == {f"{ROUTE}@v1"}, "the follower loads the adapter into its own vLLM"
        assert _route(b.url)["student_adapter"] == f"{ROUTE}@v1"

        httpx.post(f"{a.url}/admin/routes/{ROUTE}/promote", headers=ADMIN, json={"version": "v2"})
        wait_for(lambda: _route(b.url)["student_version"] == "v2", timeout_s=5)
        wait_for(lambda: vllms[1].loaded == {f"{ROUTE}@v2"}, timeout_s=5)  # the old one is retired there too

        httpx.delete(f"{b.url}/admin/routes/{ROUTE}/overrides", headers=ADMIN)  # the other way round
        wait_for(lambda: _route(a.url)["overrides"] == {}, timeout_s=5)
        assert _route(a.url)["mode"] == "auto"


def test_apply_replaces_overrides_and_reports_bad_stored_values(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings("http://teacher.test")
    store = SQLiteStore(settings.store.path)
    try:
        routes = RouteTable(settings, store)
        sync = ReplicaSync(routes, None, store, interval_s=1.0)  # type: ignore[arg-type]
        assert sync.apply_overrides({}) == []
        store.set_route_overrides(ROUTE, {"ood_threshold": 0.2, "confidence_threshold": -0.4}, "admin:x")
        overrides, live = read_shared_state(store)
        assert live == {} and sync.apply_overrides(overrides) == [ROUTE]
        assert routes.get(ROUTE).policy().ood_threshold == 0.2
        assert routes.get(ROUTE).policy().confidence_threshold == -0.4
        assert sync.apply_overrides(overrides) == [], "applying the same state again changes nothing"
        # A value the current code refuses (written by hand) is reported, not applied.
        assert sync.apply_overrides({ROUTE: {"ood_threshold": -3}}) == [ROUTE]
        assert routes.get(ROUTE).overrides == {} and "ood_threshold" in routes.get(ROUTE).ignored_overrides
    finally:
        store.close()


def test_a_local_change_racing_the_read_is_not_overwritten(make_settings: Callable[..., Settings],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings("http://teacher.test")
    store = SQLiteStore(settings.store.path)
    try:
        routes = RouteTable(settings, store)
        sync = ReplicaSync(routes, None, store, interval_s=1.0,  # type: ignore[arg-type]
                           follow_promotions=lambda: False)
        stale = read_shared_state(store)
        def racing_read(_store: SQLiteStore) -> tuple:
            routes.update(ROUTE, {"ood_threshold": 0.9}, "admin:x")  # lands between read and apply
            return stale

        monkeypatch.setattr("gateway.training.replica_sync.read_shared_state", racing_read)
        asyncio.run(sync.poll_once())
        monkeypatch.undo()
        assert routes.get(ROUTE).overrides == {"ood_threshold": 0.9}
        asyncio.run(sync.poll_once())  # the next poll reads the store, which has it too
        assert routes.get(ROUTE).overrides == {"ood_threshold": 0.9}
    finally:
        store.close()


class RefusingStudent:
    """A student server that refuses every adapter load (its disk does not hold the adapter)."""

    def __init__(self) -> None:
        self.loads = 0

    async def load_adapter(self, name: str, path: str) -> None:
        self.loads += 1
        raise UpstreamFailure("no such file", status_code=404)

    async def unload_adapter(self, name: str) -> None:
        return None

    async def chat(self, model: str, body: dict, timeout_s: float) -> None:
        raise AssertionError("a follower does not smoke-test")


def test_a_version_that_does_not_load_here_keeps_the_old_one_and_is_not_failed(
        make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings = make_settings("http://teacher.test")
    store = SQLiteStore(settings.store.path)
    try:
        registry = Registry(store)
        registry.record(CandidateVersion(ROUTE, "v1", "candidate", fake_adapter(tmp_path / "v1")))
        store.set_live_version(ROUTE, "v1")  # promoted by another replica
        routes = RouteTable(settings, store)
        student = RefusingStudent()
        swapper = Swapper(student, routes, store, route_configs={ROUTE: settings.routes[0]})
        sync = ReplicaSync(routes, swapper, store, interval_s=1.0)
        asyncio.run(sync.poll_once())
        asyncio.run(sync.poll_once())
        assert routes.get(ROUTE).student is None, "the old state (the teacher) keeps serving"
        assert student.loads == 1, "given up until the live version changes, not retried every poll"
        assert registry.get(ROUTE, "v1").status == "live", "the promoting replica judged it; a follower never fails it"
    finally:
        store.close()
