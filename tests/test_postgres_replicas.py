"""Two ``distillgate serve`` processes on one real PostgreSQL store: both answer the official
``openai`` SDK and their requests land in the one shared log; exactly one of them schedules
training (the advisory lock), and when it dies the other takes over; ``report`` reads the
shared log; an admin change and a promotion made through one replica reach the other."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI, Request

from core.registry import CandidateVersion, Registry
from core.store.postgres import PostgresStore
from harness.children import ROOT, Child, free_port, python_module
from tests.helpers import MESSAGES, UvicornThread, fake_adapter, sdk
from tests.operators import STUDENT_ANSWER, scrape, total, wait_for

pytestmark = pytest.mark.integration
ROUTE = "clinc-intents"
DSN_ENV = "DISTILLGATE_PG_DSN"
LEADER = "distillgate_training_scheduler_leader"


class VLLMStandIn:
    """One vLLM stand-in both replicas share (under uvicorn): health, adapter loads, chats."""

    def __init__(self) -> None:
        self.loads: list[str] = []
        self.app = FastAPI()
        self.app.get("/health")(lambda: {})
        self.app.post("/v1/load_lora_adapter")(self._load)
        self.app.post("/v1/unload_lora_adapter")(lambda: "ok")
        self.app.post("/v1/chat/completions")(self._chat)

    async def _load(self, request: Request) -> str:
        self.loads.append((await request.json())["lora_name"])
        return "ok"

    async def _chat(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        return {"id": "cmpl-student", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": STUDENT_ANSWER},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}}


def write_config(directory: Path, teacher_url: str, vllm_url: str) -> Path:
    directory.mkdir()
    config = {
        # The path places this replica's own spool and dead-letter file; the rows go to PostgreSQL.
        "store": {"kind": "postgres", "dsn_env": DSN_ENV, "path": str(directory / "replica.db"),
                  "sync_interval_s": 0.5},
        "vllm": {"url": vllm_url, "launch": False},
        "routes": [{"name": ROUTE, "mode": "teacher_only",
                    "teacher": {"model": "openai/replay-teacher", "api_base": f"{teacher_url}/v1", "timeout_s": 10},
                    # Frequent ticks, never enough data: a tick shows who schedules, nothing trains.
                    "training": {"interval_minutes": 0.02, "min_new_examples": 1_000_000}}],
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def vllm() -> Iterator[tuple[VLLMStandIn, str]]:
    stand_in = VLLMStandIn()
    with UvicornThread(stand_in.app) as server:
        yield stand_in, server.url


@pytest.fixture
def replicas(tmp_path: Path, replay_teacher: str, postgres_dsn: str,
             vllm: tuple[VLLMStandIn, str]) -> Iterator[list[Child]]:
    children = []
    for index in range(2):
        port = free_port()
        config = write_config(tmp_path / f"replica{index}", replay_teacher, vllm[1])
        args = python_module("cli.main", "serve", "--config", str(config), "--port", str(port),
                             "--log-dir", str(config.parent))
        children.append(Child(args, f"http://127.0.0.1:{port}/healthz", config.parent / "serve.log",
                              env={DSN_ENV: postgres_dsn, "DISTILLGATE_ADMIN_TOKEN": "t"}))
    try:
        with ThreadPoolExecutor(len(children)) as starting:  # both start (and migrate) at once
            list(starting.map(Child.start, children))
        yield children
    finally:
        for child in children:
            child.stop()


def url(child: Child) -> str:
    return child.ready_url.removesuffix("/healthz")


def leaders(children: list[Child]) -> list[float]:
    return [total(scrape(url(child)), LEADER) for child in children]


def test_two_replicas_share_the_log_and_one_schedules(replicas: list[Child], postgres_dsn: str) -> None:
    answers = [sdk(url(child)).chat.completions.with_raw_response.create(model=ROUTE, messages=MESSAGES)
               for child in replicas]
    ids = {answer.headers["x-request-id"] for answer in answers}
    assert [answer.parse().choices[0].message.content for answer in answers] == ["transfer", "transfer"]
    store = PostgresStore(postgres_dsn, max_size=2)
    try:
        wait_for(lambda: store.count_requests(ROUTE) == 2, timeout_s=10)
        assert {row["id"] for row in store.iter_requests(ROUTE, target="teacher")} == ids

        wait_for(lambda: sorted(leaders(replicas)) == [0.0, 1.0], timeout_s=15)
        leader = replicas[leaders(replicas).index(1.0)]
        standby = next(child for child in replicas if child is not leader)
        assert leader.process is not None
        os.killpg(leader.process.pid, signal.SIGKILL)  # its session ends, and the lock with it
        leader.process.wait()
        wait_for(lambda: total(scrape(url(standby)), LEADER) == 1.0, timeout_s=20)
        # The survivor keeps serving into the same log.
        assert sdk(url(standby)).chat.completions.create(model=ROUTE, messages=MESSAGES).choices
        wait_for(lambda: store.count_requests(ROUTE) == 3, timeout_s=10)
    finally:
        store.close()
    # The report reads the shared log (reporting SQL on PostgreSQL), from either replica's config.
    report = subprocess.run(python_module("cli.main", "report", "--config", str(replicas[0].log_path.parent /
                                          "config.yaml"), "--since", "all", "--json"),
                            capture_output=True, text=True, timeout=60, check=True, cwd=ROOT,
                            env={**os.environ, DSN_ENV: postgres_dsn, "PYTHONPATH": str(ROOT)})
    [route] = [summary for summary in json.loads(report.stdout)["routes"] if summary["route"] == ROUTE]
    assert route["requests"] == 3 and route["errors"] == 0 and route["student_requests"] == 0


def test_admin_changes_and_promotions_reach_every_replica(replicas: list[Child], postgres_dsn: str,
                                                         vllm: tuple[VLLMStandIn, str], tmp_path: Path) -> None:
    a, b = (url(child) for child in replicas)
    admin = {"authorization": "Bearer t"}

    def route_on_b() -> dict[str, Any]:
        return httpx.get(f"{b}/admin/routes", headers=admin).json()["data"][0]

    def target_on_b() -> str:
        raw = sdk(b).chat.completions.with_raw_response.create(model=ROUTE, messages=MESSAGES)
        return raw.headers["x-distillgate-target"]

    assert target_on_b() == "teacher"
    changed = httpx.patch(f"{a}/admin/routes/{ROUTE}", headers=admin, json={"mode": "student_only",
                                                                            "ood_threshold": 0.42})
    assert changed.status_code == 200, changed.text
    wait_for(lambda: route_on_b()["overrides"] == {"mode": "student_only", "ood_threshold": 0.42}, timeout_s=5)
    assert target_on_b() == "teacher", "student_only with no student yet: the teacher still serves"

    store = PostgresStore(postgres_dsn, max_size=2)
    try:
        Registry(store).record(CandidateVersion(ROUTE, "v1", "candidate", fake_adapter(tmp_path / "v1"),
                                                metrics={"candidate": {"confidence_threshold": -0.25}}))
    finally:
        store.close()
    promoted = httpx.post(f"{a}/admin/routes/{ROUTE}/promote", headers=admin, json={"version": "v1"})
    assert promoted.status_code == 200, promoted.text
    wait_for(lambda: route_on_b()["student_version"] == "v1", timeout_s=5)
    assert route_on_b()["student_adapter"] == f"{ROUTE}@v1"
    # Both replicas asked the shared server to load it (the second load is an idempotent no-op).
    assert vllm[0].loads.count(f"{ROUTE}@v1") == 2
    raw = sdk(b).chat.completions.with_raw_response.create(model=ROUTE, messages=MESSAGES)
    assert raw.headers["x-distillgate-target"] == "student"
    assert raw.parse().choices[0].message.content == STUDENT_ANSWER
