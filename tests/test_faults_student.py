"""Student faults behind the circuit breaker: garbage answers (httpx.MockTransport, fast tier)
and a hung vLLM (SIGSTOP/SIGCONT of the real server, integration tier). Every client request
succeeds through the teacher; the breaker opens, probes, and closes when the student is back."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from core.config import Settings
from gateway.app import Components, create_app
from gateway.upstream.student import VLLMStudent
from tests.helpers import MESSAGES, UvicornThread, log_rows, sdk
from tests.operators import scrape, total, wait_for

ROUTE = "clinc-intents"
BREAKER = {"failure_threshold": 3, "probe_interval_s": 0.1, "probe_timeout_s": 1.0}


class FlakyStudent:
    """A vLLM stand-in that answers garbage (200, body not a completion) until ``healthy``."""

    def __init__(self) -> None:
        self.healthy = False
        self.chats = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200 if self.healthy else 503)
        self.chats += 1
        if not self.healthy:
            return httpx.Response(200, content=b'{"choices": "\xff not a completion')
        body = json.loads(request.content)
        if body.get("stream"):
            chunk = {"choices": [{"index": 0, "delta": {"content": "transfer"}, "finish_reason": "stop"}]}
            return httpx.Response(200, content=f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode(),
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "transfer"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1},
        })


def _breaker_state(url: str) -> float:
    return total(scrape(url), "distillgate_student_breaker_state")


def test_garbage_student_opens_the_breaker_then_probe_closes_it(make_settings: Callable[..., Settings],
                                                                 replay_teacher: str) -> None:
    settings = make_settings(replay_teacher, route={"mode": "student_only", "student": {"serve_base_model": True}},
                             vllm={"breaker": BREAKER})
    flaky = FlakyStudent()
    student = VLLMStudent("http://student.invalid", transport=httpx.MockTransport(flaky))
    with UvicornThread(create_app(settings, Components(student=student))) as server:
        client = sdk(server.url)
        for index in range(6):
            raw = client.chat.completions.with_raw_response.create(model=ROUTE, messages=MESSAGES,
                                                                   stream=index % 2 == 1)
            assert raw.headers["x-distillgate-target"] == "teacher"
            assert raw.headers["x-distillgate-fallback"] == "true"
        assert flaky.chats == 3, "after 3 failures the breaker keeps requests off the student"
        assert _breaker_state(server.url) == 2
        ready = httpx.get(f"{server.url}/readyz").json()
        assert ready["checks"]["student"]["breaker"]["state"] == "open"

        flaky.healthy = True
        wait_for(lambda: _breaker_state(server.url) == 1, timeout_s=5)  # probe passed: half-open
        raw = client.chat.completions.with_raw_response.create(model=ROUTE, messages=MESSAGES)
        assert raw.headers["x-distillgate-target"] == "student"
        assert _breaker_state(server.url) == 0
        samples = scrape(server.url)
    assert total(samples, "distillgate_student_breaker_opened_total") == 1
    rows = log_rows(settings, 7)
    reasons = [json.loads(row["decision_reasons"])[-1] for row in rows]
    assert [reason.startswith("student_error") for reason in reasons[:3]] == [True] * 3
    assert reasons[3:6] == ["student_circuit_open"] * 3
    assert all(row["status_code"] == 200 for row in rows)


@pytest.mark.integration
def test_hung_vllm_is_bypassed_then_brought_back(make_settings: Callable[..., Settings], replay_teacher: str,
                                                 vllm_server: Any) -> None:
    """SIGSTOP the real vLLM (hung, not dead: connections open, nothing answers)."""
    student_timeout_s = 1.5
    settings = make_settings(replay_teacher, student_url=vllm_server.url, vllm={"breaker": BREAKER},
                             route={"mode": "student_only",
                                    "student": {"serve_base_model": True, "timeout_s": student_timeout_s}})
    results: list[tuple[str, float]] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def traffic(client: openai.OpenAI) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                raw = client.chat.completions.with_raw_response.create(model=ROUTE, messages=MESSAGES, max_tokens=4,
                                                                       temperature=0)
                assert raw.parse().choices[0].message.content is not None
                results.append((raw.headers["x-distillgate-target"], time.monotonic() - started))
            except (openai.APIError, AssertionError) as error:
                failures.append(error)

    with UvicornThread(create_app(settings)) as server:
        workers = [threading.Thread(target=traffic, args=(sdk(server.url),)) for _ in range(2)]
        for worker in workers:
            worker.start()
        try:
            wait_for(lambda: any(target == "student" for target, _ in results), timeout_s=30)
            os.killpg(vllm_server.pid, signal.SIGSTOP)
            wait_for(lambda: _breaker_state(server.url) == 2, timeout_s=20)
            hung_from = len(results)
            time.sleep(1.0)
        finally:
            os.killpg(vllm_server.pid, signal.SIGCONT)
        wait_for(lambda: any(target == "student" for target, _ in results[hung_from:]), timeout_s=30)
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
        assert _breaker_state(server.url) == 0
    assert failures == []
    # While hung, no request waited more than one student timeout before the teacher answered.
    assert max(seconds for _, seconds in results) < student_timeout_s + 3.0
    rows = log_rows(settings, len(results))
    assert len(rows) == len(results)
    reasons = [reason for row in rows for reason in json.loads(row["decision_reasons"])]
    assert "student_circuit_open" in reasons
    assert any("timed out" in reason for reason in reasons)
