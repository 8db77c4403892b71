"""Child servers on loopback for the demo and the benchmarks: start, wait ready, stop.

Each child runs in its own process group so stopping it also stops what it forked (vLLM's
engine, the gateway's own children).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(process: subprocess.Popen[bytes], ready_url: str, log_path: Path, timeout_s: float) -> None:
    """Return once ``ready_url`` answers (any status under 500); RuntimeError, with the log's
    tail, when the process exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r:.120} exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(ready_url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{process.args!r:.120} not ready after {timeout_s}s: {log_path.read_text()[-2000:]}")


class Child:
    """A server in its own process group, stopped (and its children) on exit."""

    def __init__(self, args: Sequence[str], ready_url: str, log_path: Path, env: dict[str, str] | None = None,
                 scrub_prefixes: Sequence[str] = ()) -> None:
        """``env`` is added to the caller's environment, less the variables named with any of
        ``scrub_prefixes`` (so a child's settings do not depend on the caller's shell)."""
        self.args, self.ready_url, self.log_path = list(args), ready_url, log_path
        inherited = {name: value for name, value in os.environ.items()
                     if not any(name.startswith(prefix) for prefix in scrub_prefixes)}
        self.env = {**inherited, "PYTHONPATH": str(ROOT), "LITELLM_LOCAL_MODEL_COST_MAP": "True", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 90.0) -> Child:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(self.args, stdout=log_file, stderr=subprocess.STDOUT, env=self.env,
                                            cwd=ROOT, start_new_session=True)
        wait_ready(self.process, self.ready_url, self.log_path, timeout_s)
        return self

    def rss_mb(self) -> float:
        assert self.process is not None
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> Child:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
