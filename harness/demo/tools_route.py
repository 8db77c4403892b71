"""The demo's tool-calling route (``--tools``): a second app that offers ten CLINC150 intents
as functions and expects the model to call the right one.

Its traffic is its own stream beside the main one (``DemoOptions.tools_share`` of the main
stream's rate; in-scope utterances of the ten intents plus out-of-scope ones at the demo's
``oos_rate``). The replay teacher answers with ``tool_calls`` (harness/replay_tools.py:
the intent's tool with ``{}`` arguments, since these tools declare no parameters; an
out-of-scope utterance gets the text ``oos`` and no call). The route is the main route's
config (prices, cascade, training, gate) with its own name, no label list and a smaller
first cycle, so it trains, is gated and is promoted by the same loop.

A call is right when it names the utterance's intent with the arguments the teacher derives
for it; for an out-of-scope utterance, when no tool is called.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from dataclasses import dataclass
from typing import Any

import openai

from core.route_config import RouteConfig
from core.store import STORE_ERRORS
from core.store.sqlite import ReadOnlyStore
from harness.demo.traffic import Query, paced
from harness.replay_tools import tool_arguments

TOOL_ROUTE = "clinc-tools"
TOOL_INTENTS = ["balance", "transfer", "pay_bill", "freeze_account", "credit_score", "exchange_rate",
                "book_flight", "book_hotel", "timer", "weather"]
SYSTEM_PROMPT = ("You are a banking and travel assistant. Call the one tool that handles the customer's "
                 "request; if no tool fits, answer oos.")


def tool_specs() -> list[dict[str, Any]]:
    """The offered functions; no description or parameters, so the student's prompt stays short."""
    return [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
            for name in TOOL_INTENTS]


def add_tool_route(config: dict[str, Any], min_new_examples: int) -> None:
    """Append the tool route to a demo config: the main route's settings under its own name."""
    route = copy.deepcopy(config["routes"][0])
    route["name"] = TOOL_ROUTE
    route.pop("labels_dataset", None)  # answers are tool calls, not intent labels
    # knn_tuned and knn_lda need labels (without them they are knn), and the threshold's unit
    # follows the detector: a route's defaults, the plain kNN score at its own threshold.
    for field in ("ood_detector", "ood_threshold"):
        route[field] = RouteConfig.model_fields[field].default
    route.setdefault("student", {})["system_prompt"] = "Call the tool:"
    route.setdefault("training", {})["min_new_examples"] = min_new_examples
    config["routes"].append(route)
    # Each route's live adapter stays loaded beside the other's, with room for a candidate.
    config.setdefault("vllm", {})["max_loras"] = max(3, int(config["vllm"].get("max_loras", 1)))


def tool_stream(splits: dict[str, list[Query]], requests: int, oos_rate: float, seed: int) -> list[Query]:
    """Shuffled training utterances of the ten intents, out-of-scope ones mixed in at ``oos_rate``."""
    from harness.demo.traffic import traffic_stream

    in_scope = [query for query in splits["train"] if query.label in TOOL_INTENTS]
    return traffic_stream({**splits, "train": in_scope}, requests, oos_rate, seed + 1)


@dataclass
class ToolOutcome:
    index: int
    query: Query
    name: str | None  # the called tool; None: no call (text answer) or a failure
    arguments: Any
    target: str | None
    student_version: str | None
    error: str | None = None
    sent_at: float = 0.0

    @property
    def name_right(self) -> bool:
        expected = self.query.label if self.query.label in TOOL_INTENTS else None
        return self.error is None and self.name == expected

    @property
    def arguments_right(self) -> bool:
        if not self.name_right or self.name is None:
            return self.name_right
        function = next(spec["function"] for spec in tool_specs() if spec["function"]["name"] == self.name)
        return bool(self.arguments == tool_arguments(function, self.query.text))


async def _send_one(client: openai.AsyncOpenAI, index: int, query: Query) -> ToolOutcome:
    sent_at = time.time()
    messages: Any = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": query.text}]
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=TOOL_ROUTE, messages=messages, tools=tool_specs(), temperature=0, max_tokens=48)
    except openai.APIError as error:
        return ToolOutcome(index, query, None, None, None, None, f"{type(error).__name__}: {error}", sent_at)
    message = raw.parse().choices[0].message
    calls = message.tool_calls or []
    name, arguments = None, None
    if calls:
        function = calls[0].function  # type: ignore[union-attr]
        name = function.name
        try:
            arguments = json.loads(function.arguments)
        except ValueError:
            arguments = function.arguments
    return ToolOutcome(index, query, name, arguments, raw.headers.get("x-distillgate-target"),
                       raw.headers.get("x-distillgate-student-version"), sent_at=sent_at)


async def send_tool_traffic(client: openai.AsyncOpenAI, queries: list[Query], rate_per_s: float | None,
                            concurrency: int = 4) -> list[ToolOutcome]:
    """The tool route's stream at its own rate, beside the main one; outcomes in query order."""
    async def send(index: int, query: Query) -> ToolOutcome:
        return await _send_one(client, index, query)

    return await paced(queries, send, concurrency, rate_per_s)


def _share(outcomes: list[ToolOutcome], right: str) -> float | None:
    return round(sum(getattr(outcome, right) for outcome in outcomes) / len(outcomes), 4) if outcomes else None


def _phase(outcomes: list[ToolOutcome]) -> dict[str, Any]:
    served = [outcome for outcome in outcomes if outcome.error is None]
    student = [outcome for outcome in served if outcome.target == "student"]
    teacher = [outcome for outcome in served if outcome.target != "student"]
    return {"requests": len(outcomes), "failed": len(outcomes) - len(served),
            "student_share": round(len(student) / len(served), 4) if served else None,
            "name_right": _share(served, "name_right"), "arguments_right": _share(served, "arguments_right"),
            "student": {"requests": len(student), "name_right": _share(student, "name_right"),
                        "arguments_right": _share(student, "arguments_right")},
            "teacher": {"requests": len(teacher), "name_right": _share(teacher, "name_right"),
                        "arguments_right": _share(teacher, "arguments_right")},
            "student_versions": sorted({outcome.student_version for outcome in student if outcome.student_version})}


def route_versions(store: ReadOnlyStore, route: str) -> list[dict[str, Any]]:
    """One route's versions with the gate's figures, oldest first."""
    try:
        rows = store.query("select version, status, note, metrics_json, train_examples, created_at, promoted_at "
                           "from student_versions where route = ? order by created_at", [route])
    except STORE_ERRORS:
        return []
    versions = []
    for row in rows:
        candidate = json.loads(row["metrics_json"] or "{}").get("candidate") or {}
        versions.append({"version": row["version"], "status": row["status"], "note": row["note"],
                         "train_examples": row["train_examples"], "promoted_at": row["promoted_at"],
                         **{key: candidate.get(key) for key in ("agreement", "served_share", "served_agreement")}})
    return versions


def tools_section(outcomes: list[ToolOutcome], store: ReadOnlyStore, phase_size: int) -> dict[str, Any]:
    """The tool route's figures for report.json: overall, per phase, and each version's gate figures."""
    sent_at = sorted(outcome.sent_at for outcome in outcomes)
    versions = route_versions(store, TOOL_ROUTE)
    promoted = sorted(row["promoted_at"] for row in versions if row["promoted_at"] is not None)
    return {"route": TOOL_ROUTE, "tools": TOOL_INTENTS, "overall": _phase(outcomes),
            "phases": [{"start": start, **_phase(outcomes[start:start + phase_size])}
                       for start in range(0, len(outcomes), phase_size)],
            "versions": versions,
            "promoted_after_request": [sum(at <= moment for at in sent_at) for moment in promoted]}


def start_tool_traffic(client: openai.AsyncOpenAI, splits: dict[str, list[Query]], requests: int,
                       rate_per_s: float | None, share: float, oos_rate: float,
                       seed: int) -> asyncio.Task[list[ToolOutcome]]:
    """The tool route's stream as a task: ``share`` of the main stream's length and rate."""
    queries = tool_stream(splits, max(1, round(requests * share)), oos_rate, seed)
    return asyncio.create_task(send_tool_traffic(client, queries, rate_per_s * share if rate_per_s else None))


def console_table(section: dict[str, Any]) -> Any:
    """Per phase: the student's share and the tool calls' accuracy, student vs teacher."""
    from rich.table import Table

    table = Table(title=f"tool route {section['route']} ({len(section['tools'])} tools): the student learning to call")
    for column in ("from request", "student share", "student name/args right", "teacher name/args right",
                   "student versions"):
        table.add_column(column)

    def pair(figures: dict[str, Any]) -> str:
        if not figures["requests"]:
            return "—"
        return f"{figures['name_right']:.1%} / {figures['arguments_right']:.1%} (n={figures['requests']})"

    for phase in section["phases"]:
        share = "—" if phase["student_share"] is None else f"{phase['student_share']:.1%}"
        table.add_row(str(phase["start"]), share, pair(phase["student"]), pair(phase["teacher"]),
                      ", ".join(phase["student_versions"]) or "-")
    return table


def plot_tools(section: dict[str, Any], path: Any) -> None:
    """``tools.png``: per phase, the student's share and its calls' accuracy beside the teacher's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts = [phase["start"] for phase in section["phases"]]

    def series(who: str | None, key: str) -> list[float]:
        return [float("nan") if (phase[who] if who else phase)[key] is None else (phase[who] if who else phase)[key]
                for phase in section["phases"]]

    figure, axis = plt.subplots(figsize=(8, 4))
    axis.plot(starts, series(None, "student_share"), marker="o", label="student share")
    axis.plot(starts, series("student", "arguments_right"), marker="s", label="student calls right (name + arguments)")
    axis.plot(starts, series("teacher", "arguments_right"), marker="^", label="teacher calls right")
    for position, request in enumerate(section["promoted_after_request"]):
        axis.axvline(request, color="green", linestyle="--", linewidth=0.9, label="promotion" if position == 0 else None)
    axis.set_ylim(0, 1.05)
    axis.set_xlabel(f"tool-route request ({section['route']})")
    axis.legend(loc="lower right", fontsize=8)
    axis.set_title("the student learning to call tools (teacher: replay stand-in)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
