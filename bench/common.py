"""Shared pieces of the benchmarks: child processes on loopback and a closed-loop load generator.

Benchmarks compare configurations side by side in one run (ratios), because these machines
are shared and noisy; absolute numbers are only for context.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
CLINC = ROOT / "data" / "clinc150" / "data_full.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Child:
    """A server in its own process group, stopped (and its children) on exit."""

    def __init__(self, args: Sequence[str], ready_url: str, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.args, self.ready_url, self.log_path = list(args), ready_url, log_path
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "LITELLM_LOCAL_MODEL_COST_MAP": "True", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 90.0) -> Child:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(self.args, stdout=log_file, stderr=subprocess.STDOUT, env=self.env,
                                            cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.args[:4]} exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.ready_url, timeout=1.0).status_code < 500:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.args[:4]} not ready after {timeout_s}s: {self.log_path.read_text()[-2000:]}")

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


@dataclass
class LoadResult:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_ms)
        count = len(ordered)

        def pct(p: float) -> float | None:
            return round(ordered[min(count - 1, int(p * count))], 3) if count else None

        return {
            "requests": count + self.errors,
            "errors": self.errors,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "mean_ms": round(statistics.fmean(ordered), 3) if count else None,
            "requests_per_s": round(count / self.wall_s, 1) if self.wall_s else None,
        }


async def closed_loop(url: str, payload: dict[str, Any], concurrency: int, requests: int,
                      headers: dict[str, str] | None = None) -> LoadResult:
    """``concurrency`` clients each sending back-to-back requests until ``requests`` are done."""
    result = LoadResult()
    remaining = requests
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60.0, headers=headers) as client:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                try:
                    response = await client.post(url, json=payload)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    result.latencies_ms.append((time.perf_counter() - started) * 1000)
                else:
                    result.errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - started
    return result
