"""``distillgate serve`` as a real process: it refuses an open gateway beyond loopback, keeps
the admin token off stdout and out of its children's environment, creates its files for its
own user only, purges on schedule, bounds every body and slow clients, logs JSON."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from core.store import SQLiteStore
from harness.children import Child, python_module
from tests.helpers import MESSAGES, free_port
from trainer.seed import teacher_row

pytestmark = pytest.mark.integration
ROUTE = "clinc-intents"
ADMIN_TOKEN = "admin-5e0c1b7f-not-for-children"
METRICS_TOKEN = "scrape-8d2e44a0-not-for-children"


def write_config(tmp_path: Path, **sections: Any) -> Path:
    teacher_port = free_port()
    config = {
        "server": {"header_timeout_s": 1.0, "body_timeout_s": 1.0, "max_body_bytes": 65_536},
        "store": {"path": str(tmp_path / "var" / "log.db"), "retention_days": 30, "purge_interval_s": 0.5},
        "vllm": {"url": f"http://127.0.0.1:{free_port()}", "launch": False},
        # A child process of the gateway: its environment must not hold the tokens.
        "replay_teacher": {"launch": True, "port": teacher_port},
        "routes": [{"name": ROUTE, "mode": "teacher_only",
                    "teacher": {"model": "openai/replay-teacher", "api_base": f"http://127.0.0.1:{teacher_port}/v1"}}],
        **sections,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def serve(config: Path, port: int, *extra: str, env: dict[str, str] | None = None) -> Child:
    args = python_module("cli.main", "serve", "--config", str(config), "--port", str(port),
                         "--log-dir", str(config.parent / "logs"), *extra)
    return Child(args, f"http://127.0.0.1:{port}/healthz", config.parent / "gateway.log", env=env)


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


@pytest.fixture
def old_rows(tmp_path: Path) -> Path:
    """A store holding rows from long ago (and one from now), written before serve starts."""
    path = tmp_path / "var" / "log.db"
    store = SQLiteStore(path)
    store.insert_requests([teacher_row(ROUTE, "ancient", "oos", created_at=1_000.0),
                           teacher_row(ROUTE, "recent", "oos", created_at=time.time())])
    store.close()
    return path


def _count(path: Path) -> int:
    store = SQLiteStore(path)
    try:
        return store.count_requests()
    finally:
        store.close()


def test_beyond_loopback_an_open_gateway_is_refused_unless_insecure(tmp_path: Path) -> None:
    config = write_config(tmp_path, replay_teacher={"launch": False})
    port = free_port()
    refused = subprocess.run([*python_module("cli.main", "serve", "--config", str(config), "--host", "0.0.0.0",
                                             "--port", str(port))], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "refusing to serve on 0.0.0.0" in refused.stderr and "no client keys" in refused.stderr
    assert "/metrics would be open" in refused.stderr and "--insecure" in refused.stderr
    keyed = {"DISTILLGATE_API_KEYS": "k-1", "DISTILLGATE_METRICS_TOKEN": METRICS_TOKEN}
    for extra, env in (((), keyed), (("--insecure",), {})):
        with serve(config, port, "--host", "0.0.0.0", *extra, env=env) as gateway:
            assert gateway.process is not None and gateway.process.poll() is None
            status = httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code
            assert status == (401 if env else 200)


@pytest.fixture
def running(tmp_path: Path, old_rows: Path) -> Iterator[tuple[str, Child, Path]]:
    config = write_config(tmp_path)
    port = free_port()
    with serve(config, port, env={"DISTILLGATE_METRICS_TOKEN": METRICS_TOKEN}) as gateway:
        yield f"http://127.0.0.1:{port}", gateway, tmp_path


def test_admin_token_in_a_private_file_never_on_stdout_or_in_children(running: tuple[str, Child, Path]) -> None:
    url, gateway, tmp_path = running
    token_file = tmp_path / "var" / "admin-token"
    token = token_file.read_text().strip()
    assert len(token) >= 32 and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    output = gateway.log_path.read_text()
    assert str(token_file) in output and token not in output
    assert httpx.get(f"{url}/admin/routes", headers={"authorization": f"Bearer {token}"}).status_code == 200
    assert gateway.process is not None
    [teacher] = children_of(gateway.process.pid)
    child_env = environ(teacher)
    assert "DISTILLGATE_METRICS_TOKEN" not in child_env and "DISTILLGATE_ADMIN_TOKEN" not in child_env
    assert METRICS_TOKEN not in "\n".join(child_env.values())


def test_a_chosen_admin_token_is_not_passed_to_children(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    port = free_port()
    with serve(config, port, env={"DISTILLGATE_ADMIN_TOKEN": ADMIN_TOKEN}) as gateway:
        assert gateway.process is not None
        assert ADMIN_TOKEN == environ(gateway.process.pid)["DISTILLGATE_ADMIN_TOKEN"]  # started with it
        [teacher] = children_of(gateway.process.pid)
        assert ADMIN_TOKEN not in "\n".join(environ(teacher).values())
        admin = httpx.get(f"http://127.0.0.1:{port}/admin/routes", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert admin.status_code == 200
    assert not (tmp_path / "var" / "admin-token").exists()
    assert ADMIN_TOKEN not in gateway.log_path.read_text()


def test_files_are_private_and_old_rows_are_purged(running: tuple[str, Child, Path]) -> None:
    url, _, tmp_path = running
    assert httpx.post(f"{url}/v1/chat/completions", json={"model": ROUTE, "messages": MESSAGES},
                      timeout=30).status_code == 200
    database = tmp_path / "var" / "log.db"
    deadline = time.monotonic() + 10
    while _count(database) != 2 and time.monotonic() < deadline:  # the ancient row goes, the new one arrives
        time.sleep(0.2)
    store = SQLiteStore(database)
    prompts = [json.loads(row["request_json"])["messages"][-1]["content"] for row in store.query(
        "select request_json from requests order by created_at")]
    store.close()
    assert prompts == ["recent", MESSAGES[-1]["content"]]
    for path in (database, database.with_name("log.db-wal"), *database.with_name("log.db.spool").iterdir(),
                 *(tmp_path / "logs").iterdir()):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for folder in (database.with_name("log.db.spool"), tmp_path / "logs"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_body_limit_and_slow_clients_on_every_route(running: tuple[str, Child, Path]) -> None:
    url, _, _ = running
    big = b"token=" + b"x" * 100_000
    login = httpx.post(f"{url}/dashboard/login", content=big,
                       headers={"content-type": "application/x-www-form-urlencoded"})
    chunked = httpx.post(f"{url}/dashboard/login", content=iter([big[:40_000], big[40_000:]]))
    assert login.status_code == chunked.status_code == 413
    assert login.json()["error"]["code"] == "request_too_large"
    port = int(url.rsplit(":", 1)[1])
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as slow_headers:
        slow_headers.sendall(b"POST /dashboard/login HTTP/1.1\r\nhost: x\r\n")  # and never the rest
        answer = _read_until_closed(slow_headers)
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 5
    with socket.create_connection(("127.0.0.1", port), timeout=10) as slow_body:
        slow_body.sendall(b"POST /dashboard/login HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n"
                          b"content-type: application/x-www-form-urlencoded\r\n\r\ntoken=")
        answer = _read_until_closed(slow_body)
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65_536):
        data += chunk
    return data


def test_logs_are_json_with_every_extra_field(running: tuple[str, Child, Path]) -> None:
    url, gateway, _ = running
    httpx.post(f"{url}/dashboard/login", data={"token": "wrong"})
    time.sleep(0.3)
    records = [json.loads(line) for line in gateway.log_path.read_text().splitlines() if line.startswith("{")]
    refused = [record for record in records if record.get("message") == "dashboard sign-in refused"]
    assert refused and refused[0]["client"] == "127.0.0.1" and refused[0]["levelname"] == "WARNING"
    ready = next(record for record in records if record.get("message") == "gateway ready")
    assert ready["routes"] == [ROUTE]


def test_cli_names_the_metrics_variable_as_the_gateway_does() -> None:
    from cli.security import METRICS_TOKEN_ENV as cli_name
    from gateway.metrics import METRICS_TOKEN_ENV

    assert cli_name == METRICS_TOKEN_ENV


def test_purge_command(tmp_path: Path, old_rows: Path) -> None:
    config = write_config(tmp_path)
    command = [sys.executable, "-m", "cli.main", "purge", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    dry = subprocess.run([*command, "--dry-run"], capture_output=True, text=True, timeout=120, env=env)
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert json.loads(dry.stdout)["would_delete"] == {"requests": 1, "shadow_results": 0, "feedback": 0}
    assert json.loads(done.stdout)["deleted"] == {"requests": 1, "shadow_results": 0, "feedback": 0}
    assert _count(old_rows) == 1
