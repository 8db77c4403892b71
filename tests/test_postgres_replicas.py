"""Two ``distillgate serve`` processes on one real PostgreSQL store: both answer the official
``openai`` SDK and their requests land in the one shared log; exactly one of them schedules
training (the advisory lock), and when it dies the other takes over; ``report`` reads the
shared log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from core.store.postgres import PostgresStore
from harness.children import ROOT, Child, free_port, python_module
from tests.helpers import MESSAGES, sdk
from tests.operators import scrape, total, wait_for

pytestmark = pytest.mark.integration
ROUTE = "clinc-intents"
DSN_ENV = "DISTILLGATE_PG_DSN"
LEADER = "distillgate_training_scheduler_leader"


def write_config(directory: Path, teacher_url: str) -> Path:
    directory.mkdir()
    config = {
        # The path places this replica's own spool and dead-letter file; the rows go to PostgreSQL.
        "store": {"kind": "postgres", "dsn_env": DSN_ENV, "path": str(directory / "replica.db")},
        "vllm": {"url": f"http://127.0.0.1:{free_port()}", "launch": False},
        "routes": [{"name": ROUTE, "mode": "teacher_only",
                    "teacher": {"model": "openai/replay-teacher", "api_base": f"{teacher_url}/v1", "timeout_s": 10},
                    # Frequent ticks, never enough data: a tick shows who schedules, nothing trains.
                    "training": {"interval_minutes": 0.02, "min_new_examples": 1_000_000}}],
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def replicas(tmp_path: Path, replay_teacher: str, postgres_dsn: str) -> Iterator[list[Child]]:
    children = []
    for index in range(2):
        port = free_port()
        config = write_config(tmp_path / f"replica{index}", replay_teacher)
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
