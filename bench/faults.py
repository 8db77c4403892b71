"""Fault injection against a real ``distillgate serve`` (its own vLLM and replay teacher
children): each fault is injected while a client sends requests, and what the client saw is
reported (statuses, who served, latencies). Prints JSON; the README's fault table comes from it.

    python bench/faults.py [--out FILE] [--base-dir DIR]

Faults, in order: vLLM SIGKILL (time until the student serves again), vLLM hung (SIGSTOP of
its process group for ``--hang-s``), a prompt longer than the student's context, an admin
PATCH with null, the database locked by another connection, the teacher killed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import CLINC, ROOT, Child, free_port, python_module

ADMIN = {"authorization": "Bearer faults-admin"}
STUDENT, TEACHER = "faults-student", "faults-teacher"
UTTERANCE = "transfer $20000 from my savings account to checking account"


def config(workdir: Path, base_dir: Path) -> dict[str, Any]:
    teacher_port = free_port()

    def route(name: str, mode: str) -> dict[str, Any]:
        return {"name": name, "mode": mode,
                "teacher": {"model": "openai/replay-teacher", "api_base": f"http://127.0.0.1:{teacher_port}/v1",
                            "max_retries": 1, "timeout_s": 10},
                "student": {"serve_base_model": True, "timeout_s": 5, "base_model": str(base_dir)}}

    return {"store": {"path": str(workdir / "faults.db"), "busy_timeout_ms": 1000},
            "vllm": {"url": f"http://127.0.0.1:{free_port()}", "launch": True,
                     "python": str(ROOT / ".venv-vllm" / "bin" / "python"), "model_dir": str(base_dir),
                     "breaker": {"failure_threshold": 3, "probe_interval_s": 0.5},
                     "supervise": {"backoff_initial_s": 0.5, "poll_interval_s": 0.5}},
            "replay_teacher": {"launch": True, "port": teacher_port, "dataset": str(CLINC), "latency_ms": 20,
                               "latency_jitter_ms": 0},
            "routes": [route(STUDENT, "student_only"), route(TEACHER, "teacher_only")]}


class Client:
    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(timeout=60.0)

    def chat(self, route: str, content: str = UTTERANCE) -> tuple[int, str, float]:
        started = time.monotonic()
        response = self.http.post(f"{self.url}/v1/chat/completions", json={
            "model": route, "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": content}]})
        return (response.status_code, response.headers.get("x-distillgate-target", "none"),
                round(time.monotonic() - started, 3))

    def readyz(self) -> dict[str, Any]:
        return self.http.get(f"{self.url}/readyz", headers=ADMIN).json()

    def student_server(self) -> dict[str, Any]:
        return self.readyz()["checks"]["student"]["server"]


def seen(results: list[tuple[int, str, float]]) -> dict[str, Any]:
    """What the client saw: statuses, who served, the slowest answer."""
    return {"requests": len(results), "statuses": dict(Counter(str(status) for status, _, _ in results)),
            "served_by": dict(Counter(target for _, target, _ in results)),
            "max_latency_s": max((seconds for _, _, seconds in results), default=None)}


def until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


def vllm_killed(client: Client) -> dict[str, Any]:
    os.kill(client.student_server()["pid"], signal.SIGKILL)
    killed, results = time.monotonic(), []
    while time.monotonic() - killed < 900:
        results.append(client.chat(STUDENT))
        if results[-1][1] == "student":
            break
        time.sleep(0.5)
    return {"fault": "vLLM SIGKILL", **seen(results), "student_back_after_s": round(time.monotonic() - killed, 1),
            "restarts": client.student_server()["restarts"]}


def vllm_hung(client: Client, hang_s: float) -> dict[str, Any]:
    group = os.getpgid(client.student_server()["pid"])
    os.killpg(group, signal.SIGSTOP)
    results, started = [], time.monotonic()
    try:
        while time.monotonic() - started < hang_s:
            results.append(client.chat(STUDENT))
    finally:
        os.killpg(group, signal.SIGCONT)
    until(lambda: client.chat(STUDENT)[1] == "student", 120)
    return {"fault": f"vLLM hung (SIGSTOP {hang_s:.0f} s)", **seen(results)}


def prompt_too_long(client: Client) -> dict[str, Any]:
    results = [client.chat(STUDENT, "transfer money to my checking account " * 200) for _ in range(5)]
    breaker = client.readyz()["checks"]["student"]["breaker"]
    return {"fault": "prompt longer than the student's max_model_len", **seen(results), "breaker": breaker["state"]}


def patch_null(client: Client) -> dict[str, Any]:
    response = client.http.patch(f"{client.url}/admin/routes/{STUDENT}", headers=ADMIN, json={"ood_threshold": None})
    return {"fault": "admin PATCH ood_threshold null", "patch_status": response.status_code,
            **seen([client.chat(STUDENT) for _ in range(3)])}


def store_locked(client: Client, store_path: Path, lock_s: float) -> dict[str, Any]:
    locker = sqlite3.connect(store_path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    results, started = [], time.monotonic()
    try:
        while time.monotonic() - started < lock_s:
            results.append(client.chat(TEACHER))
        ready = client.http.get(f"{client.url}/readyz").status_code
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    return {"fault": f"database locked {lock_s:.0f} s", **seen(results), "readyz_while_locked": ready}


def teacher_killed(client: Client, gateway_pid: int) -> dict[str, Any]:
    # The replay teacher is the server under one of the gateway's guard children.
    for guard in Path(f"/proc/{gateway_pid}/task/{gateway_pid}/children").read_text().split():
        children = Path(f"/proc/{guard}/task/{guard}/children").read_text().split()
        cmdline = Path(f"/proc/{children[0]}/cmdline").read_bytes() if children else b""
        if b"replay-teacher" in cmdline:
            os.kill(int(children[0]), signal.SIGKILL)
    time.sleep(1.0)
    return {"fault": "teacher killed", "teacher_route": seen([client.chat(TEACHER) for _ in range(3)]),
            "student_route": seen([client.chat(STUDENT) for _ in range(3)])}


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    base_dir = args.base_dir or ROOT / "var" / "models" / "soak-base"
    if not (base_dir / "config.json").exists():
        from trainer.student_init import build_student_base, texts_from_clinc

        labels = sorted({intent for split in json.loads(CLINC.read_text()).values() for _text, intent in split})
        build_student_base(texts_from_clinc(CLINC), base_dir, tokenizer_texts=labels)
    settings = config(workdir, base_dir)
    (workdir / "faults.yaml").write_text(yaml.safe_dump(settings))
    port = free_port()
    gateway = Child(python_module("cli.main", "serve", "--config", str(workdir / "faults.yaml"), "--port", str(port),
                                  "--log-dir", str(workdir)), f"http://127.0.0.1:{port}/healthz",
                    workdir / "gateway.log", env={"DISTILLGATE_ADMIN_TOKEN": "faults-admin"})
    # serve builds the router's embedder on a machine's first start (~20 s idle, 87 s seen on a
    # loaded 2-core machine): more than Child's default 90 s with the rest of the start-up.
    gateway.start(timeout_s=600)
    client = Client(f"http://127.0.0.1:{port}")
    try:
        until(lambda: client.student_server()["state"] == "ready", 900, 1.0)
        faults = [vllm_killed(client), vllm_hung(client, args.hang_s), prompt_too_long(client), patch_null(client),
                  store_locked(client, Path(settings["store"]["path"]), args.lock_s)]
        assert gateway.process is not None
        faults.append(teacher_killed(client, gateway.process.pid))
    finally:
        gateway.stop()
    return {"faults": faults}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-dir", type=Path, default=None, help="student base model (built when missing)")
    parser.add_argument("--hang-s", type=float, default=10.0)
    parser.add_argument("--lock-s", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="distillgate-faults-") as tmp:
        report = run(args, Path(tmp))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
