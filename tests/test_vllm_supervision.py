"""A real ``distillgate serve`` with its real vLLM and replay teacher children:

* ``kill -9`` of the vLLM server: ``/readyz`` and the metrics report it, clients keep getting
  answers (from the teacher), the supervisor restarts vLLM, reloads the live adapter, and the
  student serves that version again;
* ``kill -9`` of the gateway: no child survives it (vLLM, its engine core, the replay teacher).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from core.registry import CandidateVersion, Registry
from core.store import SQLiteStore
from tests.fixtures_processes import VLLM_PYTHON
from tests.helpers import free_port, group_members
from tests.operators import scrape, total, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
ROUTE = "clinc-intents"
ADMIN = {"authorization": "Bearer admin-secret"}
MESSAGES = [{"role": "user", "content": "transfer $20000 from my savings account to checking account"}]


def _config(tmp_path: Path, base_dir: Path) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    config["store"]["path"] = str(tmp_path / "db.sqlite")
    config["vllm"].update(url=f"http://127.0.0.1:{free_port()}", python=str(VLLM_PYTHON), model_dir=str(base_dir),
                          extra_args=[], breaker={"probe_interval_s": 0.5},
                          supervise={"backoff_initial_s": 0.5, "poll_interval_s": 0.5})
    teacher_port = free_port()
    config["replay_teacher"].update(port=teacher_port, dataset=str(ROOT / "data/clinc150/data_full.json"),
                                    latency_ms=0, latency_jitter_ms=0)
    route = config["routes"][0]
    route.update(mode="student_only", labels_dataset=str(ROOT / "data/clinc150/data_full.json"))
    route.pop("confidence_threshold")  # no cascade: every student answer is served
    route["gate"]["metric"] = "agreement"  # the cascade's metric needs a threshold
    route["student"].update(timeout_s=60)  # the base is vllm.model_dir; the teacher, the replay's port
    route["training"]["min_new_examples"] = 1_000_000
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _live_version(tmp_path: Path, base_dir: Path) -> None:
    from tests.helpers import make_adapter

    adapter = make_adapter(base_dir, tmp_path / "adapters" / "v1", seed=1)
    store = SQLiteStore(tmp_path / "db.sqlite")
    registry = Registry(store)
    registry.record(CandidateVersion(ROUTE, "v1", "candidate", str(adapter)))
    registry.set_live(ROUTE, "v1")
    store.close()


def _server(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/readyz", headers=ADMIN, timeout=10).json()["checks"]["student"]["server"]


def _ask(url: str) -> httpx.Headers:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    raw = client.chat.completions.with_raw_response.create(model=ROUTE, messages=MESSAGES, max_tokens=4)
    assert raw.parse().choices[0].message.content is not None
    return raw.headers


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_killed_vllm_is_restarted_and_a_killed_gateway_leaves_no_child(tmp_path: Path,
                                                                       student_base_dir: Path) -> None:
    _live_version(tmp_path, student_base_dir)
    config = _config(tmp_path, student_base_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "gateway.log").open("wb")
    gateway = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--config", str(config), "--port",
                                str(port), "--log-dir", str(tmp_path / "logs")], cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONPATH": str(ROOT), "DISTILLGATE_ADMIN_TOKEN": "admin-secret"})
    try:
        wait_for(lambda: _up(url) and _server(url)["state"] == "ready", timeout_s=600, interval_s=1)
        assert _server(url)["reloaded"] == {ROUTE: "loaded"}
        headers = _ask(url)
        assert (headers["x-distillgate-target"], headers["x-distillgate-student-version"]) == ("student", "v1")

        server_pid = _server(url)["pid"]
        [old_guard] = [guard for guard in _children(gateway.pid) if server_pid in group_members(guard)]
        os.kill(server_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: _server(url)["state"] != "ready", timeout_s=10, interval_s=0.2)
        assert total(scrape(url), "distillgate_student_server_up") == 0
        assert _ask(url)["x-distillgate-target"] == "teacher"  # clients keep getting answers
        wait_for(lambda: _server(url)["state"] == "ready", timeout_s=600, interval_s=1)
        server = _server(url)
        assert server["restarts"] == 1 and server["reloaded"] == {ROUTE: "loaded"}
        assert "status" in server["last_exit"]
        assert group_members(old_guard) == [], "the dead server's engine core was stopped too"
        wait_for(lambda: _ask(url)["x-distillgate-target"] == "student", timeout_s=60, interval_s=1)
        back_after_s = time.monotonic() - killed_at
        headers = _ask(url)
        assert headers["x-distillgate-student-version"] == "v1"
        samples = scrape(url)
        assert total(samples, "distillgate_student_server_restarts_total") == 1
        assert total(samples, "distillgate_student_server_up") == 1
        print(f"student back {back_after_s:.1f} s after the kill")

        guards = _children(gateway.pid)
        assert len(guards) == 2 and all(len(group_members(guard)) >= 2 for guard in guards)
        gateway.kill()
        gateway.wait()
        wait_for(lambda: all(group_members(guard) == [] for guard in guards), timeout_s=10, interval_s=0.2)
    finally:
        gateway.kill()
        log.close()


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
