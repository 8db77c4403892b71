"""``GET /metrics``: values move as requests are served (real uvicorn, the openai SDK, the
replay teacher, a mock vLLM student), parsed from the Prometheus text format."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.config import Settings
from core.store import SQLiteStore
from gateway.metrics import GatewayMetrics
from tests.helpers import ROOT, UvicornThread, free_port, log_rows, sdk
from tests.operators import (
    STUDENT_SETTINGS,
    UTTERANCES,
    messages,
    operator_app,
    scrape,
    total,
    wait_for,
)

ROUTE = "clinc-intents"


def test_metrics_move_as_requests_are_served(make_settings: Callable[..., Settings], replay_teacher: str) -> None:
    settings = make_settings(replay_teacher, route=STUDENT_SETTINGS)
    with UvicornThread(operator_app(settings)) as server:
        before = scrape(server.url)
        assert total(before, "distillgate_requests_total") == 0
        assert before[("distillgate_student_version_info", frozenset({("route", ROUTE), ("version", "base")}))] == 1
        assert before[("distillgate_route_ood_threshold", frozenset({("route", ROUTE)}))] == 0.5

        targets = []
        for index, (utterance, _, _) in enumerate(UTTERANCES):
            raw = sdk(server.url).chat.completions.with_raw_response.create(
                model=ROUTE, messages=messages(utterance), stream=index == 0)
            if index == 0:
                list(raw.parse())  # drain the stream so the request finishes
            targets.append(raw.headers["x-distillgate-target"])
        served = len(UTTERANCES)
        students = targets.count("student")
        assert 0 < students < served, targets
        shadowed = targets.count("student")  # streamed answers are shadowed too
        rows = log_rows(settings, served)
        wait_for(lambda: total(scrape(server.url), "distillgate_shadow_comparisons_total") == shadowed)
        after = scrape(server.url)

    assert total(after, "distillgate_requests_total") == served
    assert total(after, "distillgate_requests_total", target="student", status="200") == students
    assert total(after, "distillgate_requests_total", target="teacher", status="200") == served - students
    assert total(after, "distillgate_errors_total") == 0
    assert total(after, "distillgate_request_duration_seconds_count", target="student") == students
    assert total(after, "distillgate_upstream_duration_seconds_count") == served
    assert total(after, "distillgate_router_score_count") == served
    assert total(after, "distillgate_router_score_bucket", le="0.5") == students
    assert total(after, "distillgate_tokens_total", kind="prompt") == sum(row["prompt_tokens"] for row in rows)
    assert total(after, "distillgate_tokens_total", kind="completion") == sum(row["completion_tokens"] for row in rows)
    cost = sum(row["cost_usd"] for row in rows)
    teacher_cost = sum(row["teacher_cost_usd"] for row in rows)
    assert total(after, "distillgate_cost_dollars_total") == pytest.approx(cost)
    assert total(after, "distillgate_teacher_cost_dollars_total") == pytest.approx(teacher_cost)
    assert total(after, "distillgate_savings_dollars") == pytest.approx(teacher_cost - cost)
    assert teacher_cost > cost > 0, "the student is cheaper than the teacher"
    # The student always answers "transfer": it agrees with the teacher on the transfer utterances only.
    agreed = sum(1 for (_, label, score) in UTTERANCES if score <= 0.5 and label == "transfer")
    assert total(after, "distillgate_shadow_agreements_total", student_version="base") == agreed
    assert total(after, "distillgate_store_rows_written_total", writer="requests") == served
    assert total(after, "distillgate_store_pending_rows") == 0
    assert total(after, "distillgate_store_write_errors_total") == 0


def test_errors_fallbacks_and_training_runs(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(f"http://127.0.0.1:{free_port()}")  # nothing listens: the teacher fails
    with UvicornThread(operator_app(settings)) as server:
        with pytest.raises(openai.InternalServerError):
            sdk(server.url).chat.completions.create(model=ROUTE, messages=messages("does life have meaning"))
        store = SQLiteStore(settings.store.path)
        now = time.time()
        store.record_training_run({"route": ROUTE, "started_at": now - 60, "finished_at": now, "outcome": "promoted",
                                   "version": "v1", "detail_json": "{}"})
        store.record_training_run({"route": ROUTE, "started_at": now - 30, "finished_at": now, "outcome": "rejected",
                                   "version": "v2", "detail_json": "{}"})
        store.close()
        samples = scrape(server.url)
    assert total(samples, "distillgate_errors_total", route=ROUTE, target="teacher", status="502") == 1
    assert total(samples, "distillgate_requests_total", status="502") == 1
    assert total(samples, "distillgate_cost_dollars_total") == 0
    assert total(samples, "distillgate_training_runs_total", route=ROUTE, outcome="promoted") == 1
    assert total(samples, "distillgate_training_runs_total", route=ROUTE, outcome="rejected") == 1
    assert total(samples, "distillgate_training_last_finished_timestamp_seconds") == pytest.approx(now)
    assert total(samples, "distillgate_student_version_info", version="none") == 1  # no student yet


def test_fallback_is_counted(make_settings: Callable[..., Settings], replay_teacher: str) -> None:
    from gateway.app import Components, create_app
    from gateway.upstream.student import VLLMStudent
    from tests.helpers import failing_student

    settings = make_settings(replay_teacher, route={"mode": "student_only", "student": {"serve_base_model": True}})
    student = VLLMStudent("http://student.invalid", transport=httpx.MockTransport(failing_student))
    with UvicornThread(create_app(settings, Components(student=student))) as server:
        sdk(server.url).chat.completions.create(model=ROUTE, messages=messages("does life have meaning"))
        samples = scrape(server.url)
    assert total(samples, "distillgate_fallbacks_total", route=ROUTE) == 1
    assert total(samples, "distillgate_requests_total", target="teacher", status="200") == 1


def test_scrape_token(make_settings: Callable[..., Settings], replay_teacher: str,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLGATE_METRICS_TOKEN", "scrape-secret")
    monkeypatch.setenv("DISTILLGATE_ADMIN_TOKEN", "admin-secret")
    with UvicornThread(operator_app(make_settings(replay_teacher))) as server:
        refused = httpx.get(f"{server.url}/metrics")
        wrong = httpx.get(f"{server.url}/metrics", headers={"authorization": "Bearer nope"})
        scrape(server.url, {"authorization": "Bearer scrape-secret"})
        scrape(server.url, {"authorization": "Bearer admin-secret"})
    assert refused.status_code == wrong.status_code == 401
    assert set(refused.json()["error"]) == {"message", "type", "param", "code"}


def test_each_app_has_its_own_registry() -> None:
    first, second = GatewayMetrics(), GatewayMetrics()
    first.cost.labels(ROUTE, "teacher").inc(1.5)
    assert first.registry is not second.registry
    assert b"distillgate_cost_dollars_total" in first.exposition()
    assert b"distillgate_cost_dollars_total{" not in second.exposition()


def test_grafana_dashboard_uses_only_exported_metrics(tmp_path: Path) -> None:
    """Every series the shipped Grafana dashboard queries is one the gateway exports."""
    from core.store import BatchWriter
    from gateway.chat.record import RequestRecord

    store = SQLiteStore(tmp_path / "metrics.db")
    store.insert_shadow_results([{"request_id": "r1", "created_at": time.time(), "route": ROUTE,
                                  "student_version": "v1", "router_score": 0.2, "agree": 1}])
    store.record_training_run({"route": ROUTE, "started_at": 1.0, "finished_at": 2.0, "outcome": "promoted"})
    metrics = GatewayMetrics()
    metrics.bind(store=store, routes=[_FakeRoute()], writers=[BatchWriter(store.insert_requests)],
                 shadow=SimpleNamespace(skipped=0, failed=0))
    record = RequestRecord(route=ROUTE, request={}, stream=False, client_key_id=None, target="student",
                           router_score=0.2, fallback=True, upstream_latency_ms=3.0, cost_usd=0.1,
                           teacher_cost_usd=1.0, status_code=500)
    metrics.observe(record)
    exported = {sample.name for family in text_string_to_metric_families(metrics.exposition().decode())
                for sample in family.samples}
    store.close()
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "distillgate.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"distillgate_[a-z_]+", target["expr"])}
    assert queried and queried <= exported, queried - exported


class _FakeRoute:
    def describe(self) -> dict[str, Any]:
        return {"name": ROUTE, "student_version": None, "ood_threshold": 0.5}
