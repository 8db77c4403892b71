"""Several student servers (``vllm.urls``), fast tier: vLLM stand-ins behind httpx.MockTransport.

One server refusing connections or answering 500 → its breaker opens and the others take the
traffic; balancing by outstanding requests; a hot swap that fails on one server switches
nothing and names it; a server that comes back (or restarted without its adapters) gets the
live adapters before it takes traffic again.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.config import BreakerConfig, Settings, parse_settings
from core.registry import CandidateVersion, Registry
from core.store import SQLiteStore
from gateway.app import Components, create_app
from gateway.route_table import RouteTable
from gateway.training.swap import SwapError, Swapper
from gateway.upstream.breaker import BreakerState
from gateway.upstream.pool import StudentPool
from gateway.upstream.student import VLLMStudent
from tests.helpers import MESSAGES, UvicornThread, sdk
from tests.operators import scrape, total, wait_for

ROUTE = "clinc-intents"
BREAKER = {"failure_threshold": 3, "probe_interval_s": 0.05, "probe_timeout_s": 1.0}
STUDENT_ROUTE = {"mode": "student_only", "student": {"serve_base_model": True}}
ASK = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


class FakeVLLM:
    """A vLLM stand-in: runtime LoRA loading, 404 for an adapter it does not have, knobs for
    failures. Counts client chats per model (the breaker's "ping" probe is not counted)."""

    def __init__(self) -> None:
        self.loaded: set[str] = set()
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.chats: Counter[str] = Counter()
        self.refuse = False  # connection refused (the process is gone)
        self.status = 200  # chat answers
        self.load_status = 200
        self.failing_models: set[str] = set()  # chat on these answers 500
        self.delay_s = 0.0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.refuse:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/health":
            return httpx.Response(200)
        body = json.loads(request.content or b"{}")
        if request.url.path == "/v1/load_lora_adapter":
            return self._load(body["lora_name"])
        if request.url.path == "/v1/unload_lora_adapter":
            self.unloads.append(body["lora_name"])
            self.loaded.discard(body["lora_name"])
            return httpx.Response(200, text="ok")
        return await self._chat(body)

    def _load(self, name: str) -> httpx.Response:
        self.loads.append(name)
        if self.load_status != 200:
            return httpx.Response(self.load_status, json={"error": {"message": "load failed"}})
        if name in self.loaded:
            return httpx.Response(400, json={"error": {"message": f"The lora adapter '{name}' has already been loaded."}})
        self.loaded.add(name)
        return httpx.Response(200, text="ok")

    async def _chat(self, body: dict[str, Any]) -> httpx.Response:
        model = body["model"]
        await asyncio.sleep(self.delay_s)
        if model != "base" and model not in self.loaded:
            return httpx.Response(404, json={"error": {"message": f"The model `{model}` does not exist."}})
        if self.status != 200 or model in self.failing_models:
            return httpx.Response(500, json={"error": {"message": "engine error"}})
        if body["messages"][-1]["content"] != "ping":
            self.chats[model] += 1
        return httpx.Response(200, json={
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "transfer"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1}})


def _pool(*servers: FakeVLLM, breaker: dict[str, Any] | None = None) -> StudentPool:
    clients = [(f"http://student-{index}", VLLMStudent(f"http://student-{index}.invalid",
                                                        transport=httpx.MockTransport(server)))
               for index, server in enumerate(servers)]
    return StudentPool(clients, BreakerConfig(**(breaker or BREAKER)), probe_model="base")


def _states(url: str) -> list[str]:
    return [server["state"] for server in httpx.get(f"{url}/readyz").json()["checks"]["student"]["servers"]]


def _targets(url: str, count: int) -> Counter[str]:
    served: Counter[str] = Counter()
    for _ in range(count):
        raw = sdk(url).chat.completions.with_raw_response.create(model=ROUTE, messages=MESSAGES)
        served[raw.headers["x-distillgate-target"]] += 1
    return served


def test_a_server_refusing_connections_sends_its_traffic_to_the_other(make_settings: Callable[..., Settings],
                                                                      replay_teacher: str) -> None:
    settings = make_settings(replay_teacher, route=STUDENT_ROUTE, vllm={"breaker": BREAKER})
    down, up = FakeVLLM(), FakeVLLM()
    down.refuse = True
    with UvicornThread(create_app(settings, Components(student=_pool(down, up)))) as server:
        # Nothing was sent to the dead server: each request it would have had goes to the other.
        assert _targets(server.url, 10) == {"student": 10}
        assert up.chats["base"] == 10
        assert _states(server.url) == ["open", "closed"]
        down.refuse = False  # it comes back: probe, then the one trial request, then traffic
        wait_for(lambda: _states(server.url)[0] == "half_open", timeout_s=5)
        assert _targets(server.url, 10) == {"student": 10}
        assert _states(server.url) == ["closed", "closed"]
        samples = scrape(server.url)
    assert down.chats["base"] >= 4, "a server back in service takes its share again"
    assert total(samples, "distillgate_student_breaker_opened_total", server="http://student-0") == 1
    assert total(samples, "distillgate_student_server_requests_total") == 20 + 3  # 3 refused, then retried


def test_a_failing_server_opens_only_its_breaker(make_settings: Callable[..., Settings], replay_teacher: str) -> None:
    settings = make_settings(replay_teacher, route=STUDENT_ROUTE, vllm={"breaker": BREAKER})
    broken, healthy = FakeVLLM(), FakeVLLM()
    broken.status = 500  # it answers, badly: the request was sent, so it is not retried elsewhere
    with UvicornThread(create_app(settings, Components(student=_pool(broken, healthy)))) as server:
        served = _targets(server.url, 12)
        states = _states(server.url)
    assert served["teacher"] == 3, "three 500s (the threshold), each served by the teacher, then none"
    assert served["student"] == 9 and healthy.chats["base"] == 9
    assert states == ["open", "closed"]


async def test_balancing_alternates_when_idle_and_favours_the_less_busy_server() -> None:
    first, second = FakeVLLM(), FakeVLLM()
    pool = _pool(first, second)
    for _ in range(10):
        await pool.chat("base", ASK, 5.0)
    assert (first.chats["base"], second.chats["base"]) == (5, 5)

    first.delay_s, second.delay_s = 0.3, 0.01  # the first server is busy: its answers take longer
    tasks = []
    for _ in range(30):
        tasks.append(asyncio.create_task(pool.chat("base", ASK, 5.0)))
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    slow, fast = first.chats["base"] - 5, second.chats["base"] - 5
    assert slow + fast == 30 and fast > 2 * slow, (slow, fast)
    await pool.aclose()


def _adapter(directory: Path) -> Path:
    """A directory that passes ``validate_adapter_dir`` (the stand-ins never read the weights)."""
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"r": 8}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (directory / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    return directory


@pytest.fixture
def swap_setup(tmp_path: Path) -> Iterator[dict[str, Any]]:
    settings = parse_settings({"store": {"path": str(tmp_path / "db.sqlite")},
                               "routes": [{"name": ROUTE, "teacher": {"model": "openai/x"}}]})
    store = SQLiteStore(settings.store.path)
    registry = Registry(store)
    for version in ("v1", "v2"):
        registry.record(CandidateVersion(ROUTE, version, "candidate", str(_adapter(tmp_path / version))))
    servers = FakeVLLM(), FakeVLLM()
    pool = _pool(*servers)
    routes = RouteTable(settings, store)
    swapper = Swapper(pool, routes, store, route_configs={ROUTE: settings.routes[0]}, max_lora_rank=8)
    pool.adapters = swapper
    yield {"pool": pool, "servers": servers, "routes": routes, "registry": registry, "swapper": swapper,
           "store": store}
    store.close()


async def test_swap_switches_only_when_every_server_has_the_adapter(swap_setup: dict[str, Any]) -> None:
    swapper, routes, registry = swap_setup["swapper"], swap_setup["routes"], swap_setup["registry"]
    first, second = swap_setup["servers"]
    result = await swapper.promote(ROUTE, "v1")
    assert result.servers == 2 and first.loaded == second.loaded == {f"{ROUTE}@v1"}
    assert first.chats[f"{ROUTE}@v1"] == second.chats[f"{ROUTE}@v1"] == 1  # a smoke test on each

    second.load_status = 500
    with pytest.raises(SwapError, match=r"not loaded on 1 of 2 student servers: http://student-1"):
        await swapper.promote(ROUTE, "v2")
    assert routes.get(ROUTE).student.version == "v1", "the live version keeps serving"
    assert first.unloads == [f"{ROUTE}@v2"] and first.loaded == {f"{ROUTE}@v1"}, "no server keeps the failed one"
    assert registry.get(ROUTE, "v2").status == "failed"

    second.load_status = 200
    registry.record(CandidateVersion(ROUTE, "v3", "candidate", registry.get(ROUTE, "v2").adapter_path))
    second.failing_models.add(f"{ROUTE}@v3")  # loads, but its smoke test fails on one server
    with pytest.raises(SwapError, match=r"smoke test.*1 of 2 student servers: http://student-1"):
        await swapper.promote(ROUTE, "v3")
    assert routes.get(ROUTE).student.version == "v1"
    assert first.loaded == second.loaded == {f"{ROUTE}@v1"}


async def test_returning_servers_get_the_live_adapters_before_traffic(swap_setup: dict[str, Any]) -> None:
    """A server down at restore time is kept out until it has the live adapter; a server that
    restarted unnoticed gets it again after its first 404, its requests going elsewhere."""
    swapper, routes, pool = swap_setup["swapper"], swap_setup["routes"], swap_setup["pool"]
    first, second = swap_setup["servers"]
    await asyncio.to_thread(swap_setup["registry"].set_live, ROUTE, "v1")
    name = f"{ROUTE}@v1"
    second.load_status = 503  # still starting when the gateway restores the live versions
    pool.start()
    try:
        assert await swapper.restore_live() == {ROUTE: "loaded on 1 of 2"}
        assert routes.get(ROUTE).student.adapter_name == name
        assert [server.breaker.state for server in pool.servers] == [BreakerState.closed, BreakerState.open]
        for _ in range(4):  # all to the server that has the adapter
            await pool.chat(name, ASK, 5.0)
        assert (first.chats[name], second.chats[name]) == (4, 0)

        second.load_status = 200  # up now: the probe passes, the recovery loads the adapter
        await _until(lambda: pool.servers[1].breaker.state is BreakerState.half_open)
        assert name in second.loaded

        for _ in range(2):  # the trial request closes the returning server's breaker
            await pool.chat(name, ASK, 5.0)
        assert [server.breaker.state for server in pool.servers] == [BreakerState.closed, BreakerState.closed]

        first.loaded.clear()  # the first server restarts too fast for its breaker to see it
        before = second.chats[name]
        for _ in range(4):  # its 404s are tried on the other server: no request fails
            await pool.chat(name, ASK, 5.0)
        assert second.chats[name] - before >= 2
        await _until(lambda: name in first.loaded)
        assert first.loads.count(name) == 2, "the live adapter loaded into it again"
        assert pool.servers[0].breaker.state is BreakerState.closed, "a 404 is not a server fault"
        served_before = first.chats[name]
        for _ in range(6):
            await pool.chat(name, ASK, 5.0)
        assert first.chats[name] - served_before == 3, "back to its share"
    finally:
        await pool.close()
        await pool.aclose()


async def _until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
