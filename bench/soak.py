"""Soak: N minutes of mixed traffic against a real ``distillgate serve``, real vLLM (the
student) and the replay teacher (the stand-in for a frontier API). Prints JSON.

Traffic, in a fixed rotation: student-served (plain and streamed), teacher-served (plain and
streamed), and invalid requests (400/404 expected: counted as expected errors). Bounded in
time (``--minutes``) and count (``--max-requests``). Reports requests/s, p50/p99, expected
vs unexplained errors, RSS of the gateway and of vLLM (its whole process group) at start
and end, and log rows written vs acknowledged requests (after a graceful stop).

    python bench/soak.py [--minutes 10] [--quick] [--vllm-url URL] [--out FILE]

Without ``--vllm-url`` a vLLM server is started for the run (``.venv-vllm``; the student
base model is built under ``var/models/soak-base`` when missing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import CLINC, ROOT, Child, LoadResult, free_port, python_module
from core.store import reporting
from core.store.sqlite import ReadOnlyStore

UTTERANCES = ["transfer $20000 from my savings account to checking account", "what is my balance",
              "how do i reset my pin", "book a table for two at 7", "what's the weather like tomorrow"]
# (route, stream, expected status); invalid ones are rejected before routing and not logged.
MIX: list[tuple[str, bool, int]] = [
    ("soak-student", False, 200), ("soak-teacher", False, 200), ("soak-student", True, 200),
    ("soak-student", False, 200), ("soak-teacher", True, 200), ("soak-student", False, 200),
    ("soak-teacher", False, 200), ("invalid-temperature", False, 400), ("soak-student", True, 200),
    ("no-such-route", False, 404),
]


def gateway_config(teacher_url: str, vllm_url: str, store_path: Path) -> dict[str, Any]:
    def route(name: str, mode: str) -> dict[str, Any]:
        return {"name": name, "mode": mode,
                "teacher": {"model": "openai/replay-teacher", "api_base": f"{teacher_url}/v1", "max_retries": 2,
                            "prices": {"input_per_mtok": 2.5, "output_per_mtok": 10.0}},
                "student": {"serve_base_model": True, "timeout_s": 30}}

    return {"store": {"path": str(store_path)}, "vllm": {"url": vllm_url, "launch": False},
            "routes": [route("soak-student", "student_only"), route("soak-teacher", "teacher_only")]}


def group_rss_mb(pid: int) -> float:
    """RSS of every process in ``pid``'s process group (vLLM forks its engine)."""
    total_kb = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) != pid:
                continue
            with open(f"/proc/{entry}/status") as status:
                total_kb += next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
        except (OSError, StopIteration):
            continue
    return round(total_kb / 1024, 1)


def request_body(index: int) -> tuple[dict[str, Any], bool, int]:
    route, stream, expected = MIX[index % len(MIX)]
    body: dict[str, Any] = {"model": route, "max_tokens": 8, "temperature": 0, "stream": stream,
                            "messages": [{"role": "user", "content": UTTERANCES[index % len(UTTERANCES)]}]}
    if route == "invalid-temperature":
        body.update(model="soak-student", temperature=7)
    return body, stream, expected


class Traffic:
    def __init__(self, url: str) -> None:
        self.url = url
        self.result = LoadResult()
        self.statuses: Counter[str] = Counter()
        self.expected_errors = 0
        self.unexplained: list[str] = []
        self.acknowledged = 0
        self.sent = 0

    async def one(self, client: httpx.AsyncClient, index: int) -> None:
        body, stream, expected = request_body(index)
        started = time.perf_counter()
        try:
            async with client.stream("POST", f"{self.url}/v1/chat/completions", json=body) as response:
                text = (await response.aread()).decode(errors="replace")
        except httpx.HTTPError as error:
            self.unexplained.append(f"transport: {error!r}")
            return
        self.statuses[str(response.status_code)] += 1
        complete = not stream or response.status_code != 200 or text.rstrip().endswith("data: [DONE]")
        if response.status_code == expected == 200 and complete:
            self.acknowledged += 1
            self.result.latencies_ms.append((time.perf_counter() - started) * 1000)
        elif response.status_code == expected:
            self.expected_errors += 1
        else:
            self.unexplained.append(f"{response.status_code} (expected {expected}): {text[:200]}")

    async def run(self, seconds: float, concurrency: int, max_requests: int) -> None:
        deadline = time.monotonic() + seconds
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=60.0) as client:

            async def worker() -> None:
                while time.monotonic() < deadline and self.sent < max_requests:
                    index = self.sent
                    self.sent += 1
                    await self.one(client, index)

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            self.result.wall_s = time.perf_counter() - started


def start_vllm(workdir: Path) -> Any:
    from gateway.vllm_process import VLLMProcess
    from trainer.student_init import build_student_base, texts_from_clinc

    model_dir = ROOT / "var" / "models" / "soak-base"
    if not (model_dir / "config.json").exists():
        splits = json.loads(CLINC.read_text())
        labels = sorted({intent for split in splits.values() for _text, intent in split})
        build_student_base(texts_from_clinc(CLINC), model_dir, tokenizer_texts=labels)
    process = VLLMProcess(python=ROOT / ".venv-vllm" / "bin" / "python", model_dir=model_dir, port=free_port(),
                          log_path=workdir / "vllm.log")
    process.start()
    process.wait_ready_sync(timeout_s=400)
    process.warm_up(timeout_s=300)
    return process


def logged_rows(store_path: Path) -> dict[str, int]:
    return reporting.status_counts(ReadOnlyStore(store_path))


def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    vllm = None if args.vllm_url else start_vllm(workdir)
    vllm_url = args.vllm_url or vllm.url
    teacher_port, gateway_port = free_port(), free_port()
    teacher = Child(python_module("cli.main", "replay-teacher", "--dataset", str(CLINC), "--port",
                                  str(teacher_port), "--latency-ms", str(args.teacher_latency_ms)),
                    f"http://127.0.0.1:{teacher_port}/health", workdir / "teacher.log")
    store_path = workdir / "soak.db"
    config = workdir / "soak.yaml"
    config.write_text(yaml.safe_dump(gateway_config(f"http://127.0.0.1:{teacher_port}", vllm_url, store_path)))
    gateway = Child(python_module("cli.main", "serve", "--config", str(config), "--port", str(gateway_port),
                                  "--log-dir", str(workdir)), f"http://127.0.0.1:{gateway_port}/healthz",
                    workdir / "gateway.log", env={"DISTILLGATE_ADMIN_TOKEN": "soak"})
    try:
        teacher.start()
        gateway.start(timeout_s=600)  # a first start builds the router's embedder
        url = f"http://127.0.0.1:{gateway_port}"
        warm = Traffic(url)
        asyncio.run(warm.run(3, 2, 20))  # first requests pay imports and connection set-up
        vllm_pid = vllm.pid if vllm else None
        rss_start = {"gateway_mb": round(gateway.rss_mb(), 1), "vllm_mb": group_rss_mb(vllm_pid) if vllm_pid else None}
        traffic = Traffic(url)
        asyncio.run(traffic.run(args.seconds, args.concurrency, args.max_requests))
        rss_end = {"gateway_mb": round(gateway.rss_mb(), 1), "vllm_mb": group_rss_mb(vllm_pid) if vllm_pid else None}
    finally:
        gateway.stop()  # SIGTERM: drains, flushes the log
        teacher.stop()
        if vllm is not None:
            vllm.stop()
    rows = logged_rows(store_path)
    summary = traffic.result.summary()
    return {
        "seconds": round(traffic.result.wall_s, 1), "concurrency": args.concurrency, "sent": traffic.sent,
        "acknowledged": traffic.acknowledged, "requests_per_s": round(traffic.sent / traffic.result.wall_s, 1),
        "p50_ms": summary["p50_ms"], "p99_ms": summary["p99_ms"], "statuses": dict(traffic.statuses),
        "expected_errors": traffic.expected_errors, "unexplained_errors": len(traffic.unexplained),
        "unexplained_samples": traffic.unexplained[:5],
        "rss_start": rss_start, "rss_end": rss_end,
        "gateway_rss_growth_pct": round(100 * (rss_end["gateway_mb"] / rss_start["gateway_mb"] - 1), 2),
        "log_rows": rows, "log_rows_ok": rows.get("200", 0),
        "warm_up_acknowledged": warm.acknowledged,
        "rows_match": rows.get("200", 0) == traffic.acknowledged + warm.acknowledged,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="a ~1-minute smoke run (40 s of traffic)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests")
    parser.add_argument("--teacher-latency-ms", type=float, default=50.0)
    parser.add_argument("--vllm-url", default=None, help="use this running vLLM (serving 'base') instead")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    args.seconds = 40.0 if args.quick else args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="distillgate-soak-") as tmp:
        report = soak(args, Path(tmp))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if report["unexplained_errors"] == 0 and report["rows_match"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
