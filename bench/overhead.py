"""The gateway's added latency and throughput, side by side in one run.

Against one local OpenAI-compatible upstream (the replay teacher at zero latency), at
several concurrencies, this measures:
  direct          — clients call the upstream themselves;
  gateway_student — distillgate serving a route from that upstream as its student
                    (httpx hot path: the path most traffic takes);
  gateway_teacher — distillgate serving a route from that upstream as its teacher through
                    the plain httpx client (``teacher.client: auto`` for an openai/ teacher);
  gateway_teacher_litellm — the same teacher route through litellm (``teacher.client: litellm``);
  gateway_auto    — distillgate in auto mode with a live OOD detector (fitted on CLINC150
                    train with the configured router embedder, cache off so every request
                    is embedded and scored), then served by the student: the student path
                    plus the routing decision;
  litellm_proxy   — the LiteLLM proxy in front of the same upstream.
Each process runs alone on the machine in turn (the upstream excepted), so the numbers
compare configurations, not absolute capacity. ``--paths`` measures a subset (``direct`` is
always measured: every other figure is relative to it). Prints JSON.

    python bench/overhead.py [--requests 400] [--concurrency 1 8 32] [--quick] [--embedder static]
                             [--paths gateway_teacher gateway_teacher_litellm litellm_proxy]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import CLINC, ROOT, Child, LoadResult, closed_loop, free_port, python_module
from router.ood import ALL_DETECTORS, DEFAULT_DETECTOR

ROUTER_ARTIFACTS = ROOT / "var" / "models" / "router"

BENCH_KEY = "sk-distillgate-bench-key"
AUTH = {"authorization": f"Bearer {BENCH_KEY}"}
PAYLOAD_MESSAGES = [{"role": "user", "content": "transfer $20000 from my savings account to checking account"}]


AUTO_ROUTE = "bench-auto"
GATEWAY_PATHS = ("gateway_student", "gateway_teacher", "gateway_teacher_litellm", "gateway_auto", "litellm_proxy")


def gateway_config(upstream: str, store_path: Path, embedder: str = "static") -> dict[str, Any]:
    def route(name: str, mode: str, client: str = "auto") -> dict[str, Any]:
        return {
            "name": name,
            "mode": mode,
            "ood_threshold": 100.0,  # every scored request is in distribution: served by the student
            "teacher": {"model": "openai/replay-teacher", "api_base": f"{upstream}/v1", "max_retries": 0,
                        "client": client, "prices": {"input_per_mtok": 2.5, "output_per_mtok": 10.0}},
            "student": {"serve_base_model": True, "timeout_s": 30},
        }

    return {
        "store": {"path": str(store_path)},
        "vllm": {"url": upstream, "launch": False},
        "router": {"embedder": embedder, "artifacts_dir": str(ROUTER_ARTIFACTS), "cache_mb": 0},
        "routes": [route("bench-student", "student_only"), route("bench-teacher", "teacher_only"),
                   route("bench-teacher-litellm", "teacher_only", "litellm"), route(AUTO_ROUTE, "auto")],
    }


def fit_auto_detector(embedder: str, out: Path, kind: str | None = None) -> Path:
    """The auto route's detector (``kind``, default the router's default) on 3,000 CLINC150 training prompts."""
    from router.artifacts import create_embedder
    from router.eval_ood import load_clinc_format, subsample
    from router.ood import fit_detector_for_texts

    config = argparse.Namespace(embedder=embedder, artifacts_dir=ROUTER_ARTIFACTS, cache_mb=0.0)
    train = subsample(load_clinc_format(CLINC)["train"], 3000, 0)
    return fit_detector_for_texts([t for t, _ in train], [i for _, i in train], kind or DEFAULT_DETECTOR, out,
                                  create_embedder(config, build=True))


def serve_auto(config_path: Path, port: int, detector: Path) -> int:
    """A gateway (the real app) whose auto route has a live detector for its base-model student."""
    import uvicorn

    from core.config import load_settings
    from gateway.app import Components, create_app
    from gateway.route_table import BASE_MODEL_VERSION

    async def register(app: Any) -> None:
        await app.state.decider.aload_detector(AUTO_ROUTE, BASE_MODEL_VERSION, detector)

    app = create_app(load_settings(config_path), Components(config_path=None, extra_startup=[register]))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
    return 0


def litellm_config(upstream: str) -> dict[str, Any]:
    return {
        "model_list": [{"model_name": "bench", "litellm_params": {
            "model": "openai/replay-teacher", "api_base": f"{upstream}/v1", "api_key": "no-key"}}],
        "litellm_settings": {"telemetry": False, "drop_params": True},
        "general_settings": {"master_key": BENCH_KEY},
    }


def measure(url: str, model: str, concurrency: int, requests: int) -> LoadResult:
    payload = {"model": model, "messages": PAYLOAD_MESSAGES, "max_tokens": 8}
    asyncio.run(closed_loop(url, payload, concurrency, min(requests, 50), AUTH))  # warm-up
    return asyncio.run(closed_loop(url, payload, concurrency, requests, AUTH))


def run(requests: int, concurrencies: list[int], workdir: Path, console: Console,
        embedder: str = "static", paths: list[str] | None = None, detector_kind: str | None = None) -> dict[str, Any]:
    upstream_port, gateway_port, proxy_port = free_port(), free_port(), free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    config_path = workdir / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(gateway_config(upstream, workdir / "bench.db", embedder)))
    paths = list(paths or GATEWAY_PATHS)
    detector = (fit_auto_detector(embedder, workdir / "auto-detector", detector_kind)
                if "gateway_auto" in paths else None)
    proxy_path = workdir / "litellm.yaml"
    proxy_path.write_text(yaml.safe_dump(litellm_config(upstream)))
    targets = {
        "direct": (None, f"{upstream}/v1/chat/completions", "replay-teacher"),
        "gateway_student": ("gateway", f"http://127.0.0.1:{gateway_port}/v1/chat/completions", "bench-student"),
        "gateway_teacher": ("gateway", f"http://127.0.0.1:{gateway_port}/v1/chat/completions", "bench-teacher"),
        "gateway_teacher_litellm": ("gateway", f"http://127.0.0.1:{gateway_port}/v1/chat/completions",
                                    "bench-teacher-litellm"),
        "gateway_auto": ("auto", f"http://127.0.0.1:{gateway_port}/v1/chat/completions", AUTO_ROUTE),
        "litellm_proxy": ("proxy", f"http://127.0.0.1:{proxy_port}/v1/chat/completions", "bench"),
    }
    targets = {name: target for name, target in targets.items() if name == "direct" or name in paths}
    servers = {
        "gateway": lambda: Child(python_module("cli.main", "--log-level", "WARNING", "serve", "--config",
                                               str(config_path), "--port", str(gateway_port)),
                                 f"http://127.0.0.1:{gateway_port}/healthz", workdir / "gateway.log",
                                 env={"DISTILLGATE_API_KEYS": BENCH_KEY}),
        "auto": lambda: Child([sys.executable, str(Path(__file__).resolve()), "--serve-auto", str(config_path),
                               str(gateway_port), str(detector)],
                              f"http://127.0.0.1:{gateway_port}/healthz", workdir / "gateway-auto.log",
                              env={"DISTILLGATE_API_KEYS": BENCH_KEY}),
        "proxy": lambda: Child([str(Path(sys.executable).with_name("litellm")), "--config", str(proxy_path),
                                "--port", str(proxy_port), "--num_workers", "1"],
                               f"http://127.0.0.1:{proxy_port}/health/liveliness", workdir / "litellm.log"),
    }
    results: dict[str, dict[str, Any]] = {name: {} for name in targets}
    upstream_server = Child(python_module("cli.main", "--log-level", "WARNING", "replay-teacher", "--dataset",
                                          str(CLINC), "--port", str(upstream_port)),
                            f"{upstream}/health", workdir / "upstream.log")
    with upstream_server:
        for name, (server, url, model) in targets.items():
            child = servers[server]() if server else None
            if child:
                child.start(timeout_s=180)
            if name == "gateway_auto":
                results["auto_probe"] = probe_decision(url, model)
            try:
                for concurrency in concurrencies:
                    console.log(f"{name}: concurrency {concurrency}, {requests} requests")
                    results[name][str(concurrency)] = measure(url, model, concurrency, requests).summary()
            finally:
                if child:
                    child.stop()
    return {"embedder": embedder, "detector": (detector_kind or DEFAULT_DETECTOR) if detector else None,
            "results": results, "comparison": compare(results, concurrencies)}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 2) if numerator and denominator else None


def probe_decision(url: str, model: str) -> dict[str, Any]:
    """One auto request: proof that the detector scored it (the OOD score header) and who served."""
    import httpx

    response = httpx.post(url, json={"model": model, "messages": PAYLOAD_MESSAGES, "max_tokens": 8},
                          headers=AUTH, timeout=30)
    return {"status": response.status_code, "target": response.headers.get("x-distillgate-target"),
            "ood_score": response.headers.get("x-distillgate-ood-score")}


def compare(results: dict[str, dict[str, Any]], concurrencies: list[int]) -> dict[str, Any]:
    """Per concurrency: each gateway path's added p50/p99 over direct, its throughput against
    the LiteLLM proxy's, and the teacher path's httpx client against its litellm client."""
    comparison: dict[str, Any] = {}
    for concurrency in map(str, concurrencies):
        direct = results["direct"][concurrency]
        measured = {name: results[name][concurrency] for name in GATEWAY_PATHS if results.get(name)}
        row: dict[str, Any] = {}
        for name, figures in measured.items():
            if figures["p50_ms"] is None or direct["p50_ms"] is None:
                continue
            row[f"{name}_added_p50_ms"] = round(figures["p50_ms"] - direct["p50_ms"], 3)
            row[f"{name}_added_p99_ms"] = round(figures["p99_ms"] - direct["p99_ms"], 3)
        proxy_rps = measured.get("litellm_proxy", {}).get("requests_per_s")
        for name in GATEWAY_PATHS[:-1]:
            if name in measured and _ratio(measured[name]["requests_per_s"], proxy_rps):
                row[f"{name}_throughput_vs_litellm_proxy"] = _ratio(measured[name]["requests_per_s"], proxy_rps)
        if "gateway_teacher" in measured and "gateway_teacher_litellm" in measured:
            httpx_path, litellm_path = measured["gateway_teacher"], measured["gateway_teacher_litellm"]
            row["teacher_httpx_vs_litellm_throughput"] = _ratio(httpx_path["requests_per_s"],
                                                                litellm_path["requests_per_s"])
            row["teacher_litellm_vs_httpx_added_p50"] = _ratio(row.get("gateway_teacher_litellm_added_p50_ms"),
                                                               row.get("gateway_teacher_added_p50_ms"))
        comparison[concurrency] = row
    return comparison


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="requests per configuration and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few requests, two concurrencies")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--embedder", default="static", choices=["static", "onnx", "minilm"],
                        help="the auto route's router embedder")
    parser.add_argument("--detector", default=None, choices=sorted(ALL_DETECTORS),
                        help="the auto route's OOD detector (default: the router's default)")
    parser.add_argument("--paths", nargs="+", choices=GATEWAY_PATHS, default=list(GATEWAY_PATHS),
                        help="what to measure besides direct (default: all)")
    parser.add_argument("--serve-auto", nargs=3, metavar=("CONFIG", "PORT", "DETECTOR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_auto:
        return serve_auto(Path(args.serve_auto[0]), int(args.serve_auto[1]), Path(args.serve_auto[2]))
    if args.quick:
        args.requests, args.concurrency = 40, [1, 4]
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="distillgate-bench-") as workdir:
        report = run(args.requests, args.concurrency, Path(workdir), console, args.embedder, args.paths,
                     args.detector)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
