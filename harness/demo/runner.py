"""``distillgate demo``: the product's promise in one run, measured.

Starts the gateway on a demo config (it starts the replay teacher — the stand-in for the
frontier API — and vLLM as its children), replays a shuffled CLINC150 stream through the
official SDK while retraining runs on its schedule, then evaluates the final system on
CLINC150's held-out test + oos_test, and writes ``report.json`` and ``savings.png``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml
from pydantic import BaseModel, Field
from rich.console import Console
from rich.live import Live
from rich.table import Table

from core.store import reporting
from core.store.sqlite import ReadOnlyStore
from harness.children import ROOT, Child, free_port, python_module
from harness.demo import report
from harness.demo.traffic import (
    Outcome,
    Query,
    app_system_prompt,
    heldout_queries,
    load_splits,
    send_all,
    traffic_stream,
)

logger = logging.getLogger(__name__)
ROUTE = "clinc-intents"


class DemoOptions(BaseModel):
    requests: int = Field(10_000, ge=10)
    quick: bool = False
    out: Path = Path("var/demo")
    dataset: Path = ROOT / "data" / "clinc150" / "data_full.json"
    concurrency: int = Field(16, ge=1)
    rate_per_s: float | None = Field(10.0, gt=0, description="arrival rate of the stream; None: as fast as possible")
    oos_rate: float = Field(0.1, ge=0, le=1)
    teacher_accuracy: float = Field(0.98, ge=0, le=1)
    teacher_latency_ms: float = 300.0
    input_price_per_mtok: float = 2.50
    output_price_per_mtok: float = 10.00
    phase_size: int = 1000
    heldout_limit: int | None = None
    min_new_examples: int = 1000
    interval_minutes: float = 1.0
    shadow_rate: float = 0.02
    seed: int = 0

    @classmethod
    def quick_defaults(cls, **overrides: Any) -> DemoOptions:
        quick = {"requests": 2000, "quick": True, "rate_per_s": 8.0, "phase_size": 500, "heldout_limit": 600,
                 "min_new_examples": 500, "interval_minutes": 0.25, "teacher_latency_ms": 150.0}
        return cls(**{**quick, **overrides})


def demo_config(options: DemoOptions, gateway_port: int, teacher_port: int, vllm_port: int) -> dict[str, Any]:
    prices = {"input_per_mtok": options.input_price_per_mtok, "output_per_mtok": options.output_price_per_mtok}
    base = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    route = base["routes"][0]
    route["teacher"].update(prices=prices)
    route.update(shadow_rate=options.shadow_rate)
    route["training"].update(min_new_examples=options.min_new_examples, interval_minutes=options.interval_minutes)
    base["server"]["port"] = gateway_port
    base["store"]["path"] = str(options.out / "distillgate.db")
    base["vllm"].update(url=f"http://127.0.0.1:{vllm_port}", model_dir=str(ROOT / base["vllm"]["model_dir"]),
                        python=str(ROOT / base["vllm"]["python"]))
    base["replay_teacher"].update(port=teacher_port, latency_ms=options.teacher_latency_ms,
                                  latency_jitter_ms=options.teacher_latency_ms / 3, accuracy=options.teacher_accuracy,
                                  seed=options.seed, dataset=str(options.dataset))
    return base


class LiveStats:
    def __init__(self, total: int, store_path: Path) -> None:
        self.total, self.store_path = total, store_path
        self.outcomes: list[Outcome] = []
        self.started = time.monotonic()

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def _cost(self) -> tuple[float, float]:
        try:
            return reporting.total_costs(ReadOnlyStore(self.store_path))
        except sqlite3.Error:
            return 0.0, 0.0

    def table(self) -> Table:
        recent = self.outcomes[-200:]
        served = [outcome for outcome in recent if outcome.error is None]
        cost, all_teacher = self._cost()
        table = Table(title=f"distillgate demo — {len(self.outcomes)}/{self.total} requests "
                            f"({time.monotonic() - self.started:.0f}s)")
        for column in ("student share (last 200)", "accuracy (last 200)", "student version", "failed",
                       "cost $", "all-teacher-estimate $"):
            table.add_column(column)
        share = sum(outcome.target == "student" for outcome in served) / max(1, len(served))
        accuracy = sum(outcome.correct for outcome in served) / max(1, len(served))
        versions = {outcome.student_version for outcome in served if outcome.target == "student"}
        table.add_row(f"{share:.1%}", f"{accuracy:.1%}", ", ".join(sorted(v for v in versions if v)) or "-",
                      str(sum(outcome.error is not None for outcome in self.outcomes)), f"{cost:.4f}",
                      f"{all_teacher:.4f}")
        return table


async def _stream_with_progress(client: openai.AsyncOpenAI, system_prompt: str, queries: list[Query],
                                options: DemoOptions, console: Console) -> list[Outcome]:
    stats = LiveStats(len(queries), options.out / "distillgate.db")
    with Live(stats.table(), console=console, refresh_per_second=2, transient=False) as live:
        async def refresh() -> None:
            while True:
                await asyncio.sleep(1.0)
                live.update(stats.table())

        refresher = asyncio.create_task(refresh())
        try:
            return await send_all(client, ROUTE, system_prompt, queries, options.concurrency, stats.add,
                                  options.rate_per_s)
        finally:
            refresher.cancel()
            live.update(stats.table())


async def _references(teacher_url: str, queries: list[Query], options: DemoOptions,
                      system_prompt: str) -> list[report.Reference]:
    """What the teacher alone answers and costs for each query (a zero-latency replay teacher
    with the same seed and accuracy answers exactly as the demo's teacher would)."""
    semaphore = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=teacher_url, timeout=30) as client:
        async def one(query: Query) -> report.Reference:
            async with semaphore:
                response = await client.post("/v1/chat/completions", json={"model": "replay-teacher", "messages": [
                    {"role": "system", "content": system_prompt}, {"role": "user", "content": query.text}]})
            body = response.json()
            usage = body["usage"]
            cost = (usage["prompt_tokens"] * options.input_price_per_mtok
                    + usage["completion_tokens"] * options.output_price_per_mtok) / 1e6
            return report.Reference(body["choices"][0]["message"]["content"], cost)

        return list(await asyncio.gather(*(one(query) for query in queries)))


def _store_figures(store_path: Path) -> dict[str, Any]:
    store = ReadOnlyStore(store_path)
    tally = reporting.loop_tally(store)
    versions = [_version_summary(row["version"], row["status"], row["note"], row["metrics_json"],
                                 row["train_examples"]) for row in tally.pop("versions")]
    return {"costs": reporting.request_costs(store), **tally, "versions": versions}


def _version_summary(version: str, status: str, note: str | None, metrics_json: str | None,
                     train_examples: int | None) -> dict[str, Any]:
    """How each trained student did on the holdout: the loop's learning curve."""
    candidate = json.loads(metrics_json or "{}").get("candidate") or {}
    return {"version": version, "status": status, "note": note, "train_examples": train_examples,
            **{key: candidate.get(key) for key in ("agreement", "validity", "served_share", "served_agreement")}}


def _start_stack(options: DemoOptions, console: Console) -> tuple[list[Child], str, str]:
    gateway_port, teacher_port, vllm_port, reference_port = free_port(), free_port(), free_port(), free_port()
    config_path = options.out / "demo.yaml"
    config_path.write_text(yaml.safe_dump(demo_config(options, gateway_port, teacher_port, vllm_port)))
    reference = Child(
        python_module("cli.main", "--log-level", "WARNING", "replay-teacher", "--dataset", str(options.dataset),
                      "--port", str(reference_port), "--accuracy", str(options.teacher_accuracy),
                      "--seed", str(options.seed)),
        f"http://127.0.0.1:{reference_port}/health", options.out / "logs" / "reference-teacher.log")
    gateway = Child(
        python_module("cli.main", "serve", "--config", str(config_path), "--log-dir", str(options.out / "logs")),
        f"http://127.0.0.1:{gateway_port}/healthz", options.out / "logs" / "gateway.log",
        env={"DISTILLGATE_ADMIN_TOKEN": "demo-admin-token"})
    console.log("starting the gateway (it starts the replay teacher and vLLM)")
    children = [reference.start(), gateway.start(timeout_s=600)]
    return children, f"http://127.0.0.1:{gateway_port}", f"http://127.0.0.1:{reference_port}"


async def _run(options: DemoOptions, console: Console) -> dict[str, Any]:
    splits = load_splits(options.dataset)
    labels = sorted({query.label for query in splits["train"]})
    system_prompt = app_system_prompt(labels)
    stream = traffic_stream(splits, options.requests, options.oos_rate, options.seed)
    heldout = heldout_queries(splits, options.heldout_limit, options.seed)
    children, gateway_url, reference_url = _start_stack(options, console)
    try:
        client = openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0, timeout=120)
        started = time.monotonic()
        outcomes = await _stream_with_progress(client, system_prompt, stream, options, console)
        stream_wall_s = time.monotonic() - started
        console.log(f"stream done in {stream_wall_s:.0f}s; evaluating on {len(heldout)} held-out queries")
        heldout_outcomes = await send_all(client, ROUTE, system_prompt, heldout, options.concurrency)
        references = await _references(reference_url, stream + heldout, options, system_prompt)
    finally:
        for child in reversed(children):
            child.stop()
    figures = _store_figures(options.out / "distillgate.db")
    stream_refs, heldout_refs = references[:len(stream)], references[len(stream):]
    overall = report.summarize(outcomes, stream_refs, figures["costs"])
    overall["cost_usd_with_shadow"] = round(overall["cost_usd"] + figures["shadow_cost_usd"], 6)
    overall["cost_vs_all_teacher"] = round(overall["cost_usd_with_shadow"] / overall["all_teacher_cost_usd"], 4) \
        if overall["all_teacher_cost_usd"] else None
    return {
        "options": json.loads(options.model_dump_json()),
        "stream_wall_s": round(stream_wall_s, 1),
        "versions": figures["versions"],
        "overall": {**overall, "retrains": figures["retrains"], "swaps": figures["swaps"],
                    "shadow_requests": figures["shadow_requests"], "shadow_cost_usd": figures["shadow_cost_usd"]},
        "phases": report.phases(outcomes, stream_refs, figures["costs"], options.phase_size),
        "heldout": report.heldout_section(heldout_outcomes, heldout_refs, figures["costs"]),
        "goals": report.goals(overall),
    }


def run_demo(options: DemoOptions, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "distillgate.db").unlink(missing_ok=True)
    result = asyncio.run(_run(options, console))
    (options.out / "report.json").write_text(json.dumps(result, indent=2))
    from harness.demo.plot import plot_savings

    plot_savings(result, options.out / "savings.png")
    return result
