"""Shared pieces of the benchmarks: a closed-loop load generator (child servers: harness.children).

Benchmarks compare configurations side by side in one run (ratios), because these machines
are shared and noisy; absolute numbers are only for context.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from harness.children import ROOT, Child, free_port, python_module

__all__ = ["CLINC", "ROOT", "Child", "LoadResult", "closed_loop", "free_port", "python_module"]

CLINC = ROOT / "data" / "clinc150" / "data_full.json"


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
