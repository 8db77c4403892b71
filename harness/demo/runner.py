"""``distillgate demo``: the product's promise in one run, measured.

Starts the gateway on a demo config (it starts the replay teacher — the stand-in for the
frontier API — and vLLM as its children), replays a shuffled CLINC150 stream through the
official SDK while retraining runs on its schedule, then evaluates the final system on
CLINC150's held-out test + oos_test, and writes ``report.json`` and ``savings.png``: per
phase and overall figures, savings net of shadow calls and training compute with the
break-even request, and the issue's goals, each met, not met or undefined.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import openai
from rich.console import Console
from rich.live import Live
from rich.table import Table

from core.config import Prices, Settings
from core.store import STORE_ERRORS, reporting
from core.store.canaries import canary_tally, feedback_totals
from core.store.sqlite import ReadOnlyStore
from harness.demo import report, tools_route
from harness.demo.goals import FULL_LAST_WINDOW, goals
from harness.demo.options import DemoOptions
from harness.demo.savings import request_position, timeline, training_charges, training_summary
from harness.demo.shift import drift_retrains, new_intent_figures, shift_section
from harness.demo.stack import start_stack
from harness.demo.traffic import (
    Outcome,
    Query,
    app_system_prompt,
    demo_intents,
    held_back_intents,
    heldout_queries,
    load_domains,
    load_splits,
    send_all,
    traffic_stream,
)

logger = logging.getLogger(__name__)
__all__ = ["DemoOptions", "run_demo"]


class LiveStats:
    def __init__(self, total: int, store_path: Path, shift_at: int | None = None) -> None:
        self.total, self.store_path, self.shift_at = total, store_path, shift_at
        self.outcomes: list[Outcome] = []
        self.started = time.monotonic()

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def _cost(self) -> tuple[float, float]:
        try:
            return reporting.total_costs(ReadOnlyStore(self.store_path))
        except STORE_ERRORS:
            return 0.0, 0.0

    def _shift_note(self) -> str:
        """Where the stream is against the shift phase, and the drift-started cycles so far."""
        if self.shift_at is None:
            return ""
        try:
            cycles = len(drift_retrains(ReadOnlyStore(self.store_path), None))
        except STORE_ERRORS:
            cycles = 0
        when = "new intents since" if len(self.outcomes) >= self.shift_at else "new intents from"
        return f" — {when} request {self.shift_at:,}; drift retrains: {cycles}"

    def table(self) -> Table:
        recent = self.outcomes[-200:]
        served = [outcome for outcome in recent if outcome.error is None]
        cost, all_teacher = self._cost()
        table = Table(title=f"distillgate demo — {len(self.outcomes)}/{self.total} requests "
                            f"({time.monotonic() - self.started:.0f}s){self._shift_note()}")
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


async def _stream_with_progress(client: openai.AsyncOpenAI, route: str, system_prompt: str, queries: list[Query],
                                options: DemoOptions, console: Console) -> list[Outcome]:
    stats = LiveStats(len(queries), options.out / "distillgate.db", options.shift_at)
    with Live(stats.table(), console=console, refresh_per_second=2, transient=False) as live:
        async def refresh() -> None:
            while True:
                await asyncio.sleep(1.0)
                live.update(stats.table())

        refresher = asyncio.create_task(refresh())
        try:
            return await send_all(client, route, system_prompt, queries, options.concurrency, stats.add,
                                  options.rate_per_s)
        finally:
            refresher.cancel()
            live.update(stats.table())


async def _references(teacher_url: str, queries: list[Query], prices: Prices | None,
                      system_prompt: str) -> list[report.Reference]:
    """What the teacher alone answers and costs for each query (a zero-latency replay teacher
    with the same seed and accuracy answers exactly as the demo's teacher would), priced as
    the route prices its teacher."""
    semaphore = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=teacher_url, timeout=30, trust_env=False) as client:
        async def one(query: Query) -> report.Reference:
            async with semaphore:
                response = await client.post("/v1/chat/completions", json={"model": "replay-teacher", "messages": [
                    {"role": "system", "content": system_prompt}, {"role": "user", "content": query.text}]})
            response.raise_for_status()
            body = response.json()
            usage = body["usage"]
            cost = prices.cost(usage["prompt_tokens"], usage["completion_tokens"]) if prices else 0.0
            return report.Reference(body["choices"][0]["message"]["content"], cost)

        return list(await asyncio.gather(*(one(query) for query in queries)))


def _version_summary(row: dict[str, Any]) -> dict[str, Any]:
    """How each trained student did on the holdout: the loop's learning curve."""
    candidate = json.loads(row["metrics_json"] or "{}").get("candidate") or {}
    return {"version": row["version"], "status": row["status"], "note": row["note"],
            "train_examples": row["train_examples"], "promoted_at": row["promoted_at"],
            **{key: candidate.get(key) for key in ("agreement", "validity", "served_share", "served_agreement")}}


def _loop_section(tally: dict[str, Any], sent_at: list[float], stream_end: float) -> dict[str, Any]:
    """The training loop on the stream: retrains, promotions, and after which request each came."""
    promoted = sorted(row["promoted_at"] for row in tally["versions"]
                      if row["promoted_at"] is not None and row["promoted_at"] <= stream_end)
    positions = [request_position(sent_at, at) for at in promoted]
    return {"retrains": tally["retrains"], "swaps": tally["swaps"], "promotions_during_stream": len(promoted),
            "promoted_after_request": positions, "first_promotion_request": positions[0] if positions else None}


def _assemble(options: DemoOptions, settings: Settings, outcomes: list[Outcome], heldout_outcomes: list[Outcome],
              references: list[report.Reference], stream_end: float, held_back: list[str]) -> dict[str, Any]:
    """Every figure of the run, from the client's outcomes and the gateway's store."""
    store, route = ReadOnlyStore(options.out / "distillgate.db"), settings.routes[0].name
    tally, costs = reporting.loop_tally(store), reporting.request_costs(store)
    # The main route's versions only (with --tools the tool route has its own, in "tools").
    tally["versions"] = [row for row in tally["versions"] if row.get("route", settings.routes[0].name)
                         == settings.routes[0].name]
    stream_refs, heldout_refs = references[:len(outcomes)], references[len(outcomes):]
    sent_at = sorted(outcome.sent_at for outcome in outcomes)
    charges = training_charges(reporting.training_compute(store), settings.costs, stream_end)
    savings = timeline(outcomes, stream_refs, costs, reporting.shadow_costs(store), charges, stream_end)
    overall = report.summarize(outcomes, stream_refs, costs)
    overall["cost_usd_with_shadow"] = round(overall["cost_usd"] + savings["shadow_cost_usd"], 6)
    overall["cost_vs_all_teacher"] = round(overall["cost_usd_with_shadow"] / overall["all_teacher_cost_usd"], 4) \
        if overall["all_teacher_cost_usd"] else None
    window = min(FULL_LAST_WINDOW, len(outcomes))
    result = {
        "options": json.loads(options.model_dump_json()),
        "versions": [_version_summary(row) for row in tally["versions"]],
        "loop": _loop_section(tally, sent_at, stream_end),
        "overall": {**overall, "shadow_requests": tally["shadow_requests"],
                    "shadow_cost_usd": savings["shadow_cost_usd"]},
        "phases": report.phases(outcomes, stream_refs, costs, options.phase_size),
        "last_window": {"requests": window, **report.summarize(outcomes[-window:], stream_refs[-window:], costs)},
        "heldout": report.heldout_section(heldout_outcomes, heldout_refs, costs),
        "savings": {**savings, "training": training_summary(charges, settings.costs, sent_at)},
        # Canary rollouts (rollout.canary_share; off in configs/default.yaml) and feedback (the
        # demo sends none): counted from the store whatever the config.
        "rollout": {"canaries": canary_tally(store), "feedback": feedback_totals(store)},
    }
    if options.shift_at is not None:
        result["shift"] = {**shift_section(outcomes, options.shift_at, held_back, drift_retrains(store, route),
                                           tally["versions"], stream_end, settings.routes[0].training.min_new_examples),
                           "heldout_new_intents": new_intent_figures(
                               [outcome for outcome in heldout_outcomes if outcome.query.label in held_back])}
    result["goals"] = goals(result, options.quick)
    return result


async def _run(options: DemoOptions, console: Console) -> dict[str, Any]:
    splits = load_splits(options.dataset)
    labels = sorted({query.label for query in splits["train"]})
    system_prompt = app_system_prompt(labels)
    intents = demo_intents(splits, options.intents, options.seed)
    held_back = held_back_intents(intents, options.shift_share, options.seed, load_domains(options.dataset)) \
        if options.shift_at is not None else []
    chosen = intents if options.intents is not None else None
    stream = traffic_stream(splits, options.requests, options.oos_rate, options.seed, intents=chosen,
                            held_back=held_back, shift_at=None if options.shift_at is None else options.shift_at - 1)
    heldout = heldout_queries(splits, options.heldout_limit, options.seed, intents=chosen)
    stack = await asyncio.to_thread(start_stack, options, progress=console.log)
    route = stack.settings.routes[0]
    try:
        client = _client(stack.gateway_url, stack.credentials.client_key)
        started = time.monotonic()
        tool_traffic = tools_route.start_tool_traffic(
            client, splits, options.requests, options.rate_per_s, options.tools_share, options.oos_rate,
            options.seed) if options.tools else None
        outcomes = await _stream_with_progress(client, route.name, system_prompt, stream, options, console)
        tool_outcomes = await tool_traffic if tool_traffic is not None else []
        stream_end, stream_wall_s = time.time(), time.monotonic() - started
        console.log(f"stream done in {stream_wall_s:.0f}s; evaluating on {len(heldout)} held-out queries")
        # With the key not trusted for training: no version is trained on the held-out queries.
        evaluation = _client(stack.gateway_url, stack.credentials.evaluation_key)
        heldout_outcomes = await send_all(evaluation, route.name, system_prompt, heldout, options.concurrency)
        references = await _references(stack.reference_url, stream + heldout, route.teacher.prices, system_prompt)
    finally:
        stack.stop()
    result = _assemble(options, stack.settings, outcomes, heldout_outcomes, references, stream_end, held_back)
    if options.tools:
        phase = max(1, round(options.phase_size * options.tools_share))
        result["tools"] = tools_route.tools_section(tool_outcomes, ReadOnlyStore(options.out / "distillgate.db"), phase)
    return {"stream_wall_s": round(stream_wall_s, 1), **result}


def _client(gateway_url: str, key: str) -> openai.AsyncOpenAI:
    """A client with one of the demo's keys, and no proxy or other setting from the caller's shell."""
    return openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key=key, max_retries=0, timeout=120,
                              http_client=openai.DefaultAsyncHttpxClient(trust_env=False))


def _fresh_store(path: Path) -> None:
    """Each run starts from an empty store: a previous run's database, WAL or spool (which
    the gateway would replay into the new database) would count as this run's traffic."""
    for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)
    shutil.rmtree(path.with_name(path.name + ".spool"), ignore_errors=True)


def run_demo(options: DemoOptions, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    options.out.mkdir(parents=True, exist_ok=True)
    _fresh_store(options.out / "distillgate.db")
    result = asyncio.run(_run(options, console))
    (options.out / "report.json").write_text(json.dumps(result, indent=2))
    from harness.demo.plot import plot_savings

    plot_savings(result, options.out / "savings.png")
    if "tools" in result:
        tools_route.plot_tools(result["tools"], options.out / "tools.png")
    return result
