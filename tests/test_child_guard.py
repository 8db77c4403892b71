"""Children die with the gateway, even a SIGKILLed one, and a stray server on a child's port
is refused rather than silently reused (real processes)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gateway.vllm_process import VLLMProcess, VLLMStartError
from tests.helpers import group_members
from tests.operators import wait_for

ROOT = Path(__file__).resolve().parents[1]
SLEEPER = "import time; time.sleep(300)"
# A server that forks a worker of its own, as vLLM forks its engine core.
FORKING_SERVER = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {SLEEPER!r}]); time.sleep(300)"


@pytest.fixture
def listening_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_sigkilled_parent_takes_the_guarded_server_and_its_workers_along() -> None:
    parent_code = textwrap.dedent(f"""
        import subprocess, sys, time
        from gateway.child_guard import guarded
        child = subprocess.Popen(guarded([sys.executable, "-c", {FORKING_SERVER!r}]), start_new_session=True)
        print(child.pid, flush=True)
        time.sleep(300)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert parent.stdout is not None
        guard = int(parent.stdout.readline())
        wait_for(lambda: len(group_members(guard)) == 3, timeout_s=10)  # guard, server, worker
        parent.kill()
        parent.wait()
        wait_for(lambda: group_members(guard) == [], timeout_s=5)
    finally:
        parent.kill()


def test_the_guard_forwards_sigterm_and_exits_with_the_status() -> None:
    from gateway.child_guard import guarded

    child = subprocess.Popen(guarded([sys.executable, "-c", "import signal, sys, time\n"
                                      "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\ntime.sleep(60)"]))
    time.sleep(0.5)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=10) == 7


def test_vllm_refuses_a_port_another_server_holds(listening_port: int, tmp_path: Path) -> None:
    process = VLLMProcess(python=Path(sys.executable), model_dir=tmp_path, port=listening_port)
    with pytest.raises(VLLMStartError, match="already in use"):
        process.start()
    assert not process.running()


def test_serve_refuses_a_stray_replay_teacher(listening_port: int, tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    config["vllm"]["launch"] = False
    config["replay_teacher"]["port"] = listening_port
    config["store"]["path"] = str(tmp_path / "db.sqlite")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    completed = subprocess.run([sys.executable, "-m", "cli.main", "serve", "--config", str(path), "--port", "0",
                                "--log-dir", str(tmp_path / "logs")], capture_output=True, text=True, timeout=60,
                               cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert f"port {listening_port} is already in use" in completed.stderr
