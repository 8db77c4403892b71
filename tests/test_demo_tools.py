"""The demo's tool-calling route (``distillgate demo --tools``).

Fast tier: the route's config and the report's figures on built outcomes. Integration: the
route's loop through real parts: the replay teacher answering with ``tool_calls``, the
gateway under uvicorn with its training schedule (``distillgate train`` as a child process,
the gate, the hot swap into a real vLLM), and the official openai SDK, which parses the
promoted student's ``tool_calls``.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from core.config import parse_settings
from core.store import SQLiteStore
from gateway.app import Components, create_app
from harness.demo.options import DemoOptions
from harness.demo.stack import demo_config
from harness.demo.tools_route import (
    SYSTEM_PROMPT,
    TOOL_INTENTS,
    TOOL_ROUTE,
    ToolOutcome,
    tool_specs,
    tools_section,
)
from harness.demo.traffic import Query
from tests.helpers import CLINC, ROOT, UvicornThread, sdk

ADMIN = {"authorization": "Bearer admin-secret"}


# -- fast tier -----------------------------------------------------------------------------------
def test_the_tool_route_is_opt_in_and_a_copy_of_the_main_route() -> None:
    assert DemoOptions.quick_defaults().tools is False and DemoOptions().tools is False
    plain = demo_config(DemoOptions(out=Path("/tmp/x")), 1, 2, 3)
    config = demo_config(DemoOptions(out=Path("/tmp/x"), tools=True, tools_min_new_examples=120), 1, 2, 3)
    assert [route["name"] for route in plain["routes"]] == ["clinc-intents"]
    main, tools = config["routes"]
    assert tools["name"] == TOOL_ROUTE and "labels_dataset" not in tools and "labels_dataset" in main
    assert tools["training"]["min_new_examples"] == 120 and tools["gate"] == main["gate"]
    # Without labels a label-tuned detector is plain knn, so the tool route scores in knn's unit.
    assert main["ood_detector"] == "knn_tuned" and (tools["ood_detector"], tools["ood_threshold"]) == ("knn", 0.5)
    assert parse_settings(config, ROOT / "configs" / "default.yaml").routes[1].name == TOOL_ROUTE


def _outcome(index: int, label: str, name: str | None, arguments: Any, target: str) -> ToolOutcome:
    return ToolOutcome(index, Query(f"utterance {index}", label), name, arguments, target,
                       "v2" if target == "student" else None, sent_at=float(index))


def test_report_scores_names_and_arguments_student_vs_teacher(tmp_path: Path) -> None:
    outcomes = [_outcome(0, "balance", "balance", {}, "teacher"), _outcome(1, "oos", None, None, "teacher"),
                _outcome(2, "transfer", "balance", {}, "teacher"),  # wrong name
                _outcome(3, "balance", "balance", {}, "student"),
                _outcome(4, "timer", "timer", {"minutes": 3}, "student"),  # right name, wrong arguments
                _outcome(5, "oos", "balance", {}, "student")]  # called where none fits
    SQLiteStore(tmp_path / "db.sqlite").close()
    from core.store.sqlite import ReadOnlyStore

    section = tools_section(outcomes, ReadOnlyStore(tmp_path / "db.sqlite"), phase_size=3)
    first, second = section["phases"]
    assert first["student_share"] == 0 and first["teacher"] == {"requests": 3, "name_right": 0.6667,
                                                                "arguments_right": 0.6667}
    assert second["student_share"] == 1 and second["student"] == {"requests": 3, "name_right": 0.6667,
                                                                  "arguments_right": 0.3333}
    assert second["student_versions"] == ["v2"] and section["versions"] == []


# -- integration: the tool route's loop through real processes ----------------------------------
INTENTS = TOOL_INTENTS[:3]  # few intents: a small, fast training run; the demo offers all ten


def _config(tmp_path: Path, teacher_url: str, vllm_url: str, base_dir: Path) -> dict[str, Any]:
    """The tool route as the demo builds it, on a small first cycle and a test-sized gate."""
    demo = demo_config(DemoOptions(out=tmp_path, tools=True), 1, 2, 3)
    route = next(route for route in demo["routes"] if route["name"] == TOOL_ROUTE)
    route["teacher"]["api_base"] = f"{teacher_url}/v1"
    # 5 epochs, not the route's 10: 226 examples at 10 reached 0.97 holdout agreement with a
    # final loss of 5e-4, and training is nearly all of this test's time.
    route["training"].update(min_new_examples=200, interval_minutes=0.05, holdout_fraction=0.15, epochs=5)
    # A few hundred examples of three intents: the route's own cascade and gate at a size a
    # test can reach (as tests/test_tools_trained.py); the demo keeps the default gate.
    route["gate"] = {"minimum": 0.5, "tolerance": 0.02}
    route.pop("cascade", None)
    route.pop("confidence_threshold", None)
    route["shadow_rate"] = 0.0
    return {"store": {"path": str(tmp_path / "distillgate.db"), "flush_interval_s": 0.01},
            "router": {"embedder": "static", "artifacts_dir": str(ROOT / "var" / "models" / "router")},
            "vllm": {"url": vllm_url, "launch": False, "model_dir": str(base_dir), "max_loras": 2},
            "auth": {"admin_token_env": "DISTILLGATE_ADMIN_TOKEN"}, "routes": [route]}


def _ask(client: Any, text: str) -> Any:
    tools: Any = [spec for spec in tool_specs() if spec["function"]["name"] in INTENTS]
    return client.chat.completions.with_raw_response.create(
        model=TOOL_ROUTE, tools=tools, temperature=0, max_tokens=48,
        messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}])


def _live_version(url: str) -> dict[str, Any] | None:
    rows = httpx.get(f"{url}/admin/routes/{TOOL_ROUTE}/versions", headers=ADMIN, timeout=10).json()["data"]
    return next((row for row in rows if row.get("status") == "live"), None)


@pytest.mark.integration
def test_the_tool_route_student_is_promoted_and_calls_tools(replay_teacher: str, vllm_server: Any,
                                                             student_base_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from router.artifacts import ensure_embedder

    monkeypatch.setenv("DISTILLGATE_ADMIN_TOKEN", "admin-secret")
    ensure_embedder("static", ROOT / "var" / "models" / "router")
    config = _config(tmp_path, replay_teacher, vllm_server.url, student_base_dir)
    config_path = tmp_path / "tools.yaml"
    config_path.write_text(yaml.safe_dump(config))
    settings = parse_settings(config, config_path)
    rows = [(text, intent) for text, intent in json.loads(CLINC.read_text())["train"] if intent in INTENTS]
    random.Random(0).shuffle(rows)  # CLINC lists each intent's rows together: the first cycle must see all three
    with UvicornThread(create_app(settings, Components(config_path=config_path))) as server:
        client = sdk(server.url)
        before = [_ask(client, text) for text, _ in rows[:260]]
        assert all(raw.headers["x-distillgate-target"] == "teacher" for raw in before)
        assert all(raw.parse().choices[0].message.tool_calls for raw in before)  # the teacher calls
        deadline, live = time.monotonic() + 600, None
        while live is None and time.monotonic() < deadline:
            time.sleep(2)
            live = _live_version(server.url)
        assert live is not None, httpx.get(f"{server.url}/admin/routes/{TOOL_ROUTE}/versions", headers=ADMIN).text
        answered = []
        for text, intent in rows[260:300]:
            raw = _ask(client, text)
            choice = raw.parse().choices[0]
            if raw.headers["x-distillgate-target"] == "student":
                calls = choice.message.tool_calls or []
                answered.append((intent, [(call.function.name, json.loads(call.function.arguments))
                                          for call in calls]))
    assert len(answered) >= 10, answered  # the promoted student serves the route
    called = [(intent, calls) for intent, calls in answered if calls]
    assert len(called) >= 0.8 * len(answered), answered  # ... with tool_calls the SDK parses
    assert all(len(calls) == 1 and calls[0][0] in INTENTS and calls[0][1] == {} for _, calls in called), answered
    right = sum(calls[0][0] == intent for intent, calls in called)
    assert right >= 0.5 * len(called), answered  # chance is 1/3
