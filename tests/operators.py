"""Helpers for the operators' view tests (metrics, dashboard, report): a gateway whose router
scores requests and whose student answers over a mock vLLM transport, so traffic splits
between student and teacher, shadow comparisons are logged and costs differ."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from core.config import Settings
from gateway.app import Components, create_app
from gateway.upstream.student import VLLMStudent
from router.decision import Decision, RoutePolicy, decide_without_score

STUDENT_ANSWER = "transfer"
# CLINC150 train utterances with their labels and the OOD score the test router gives them.
UTTERANCES: list[tuple[str, str, float]] = [
    ("i need $20000 transferred from my savings to my checking", "transfer", 0.10),
    ("complete a transaction from savings to checking of $20000", "transfer", 0.20),
    ("transfer $20000 from my savings account to checking account", "transfer", 0.25),
    ("take $20000 from savings and put it in checking", "transfer", 0.30),
    ("please set a 4 minute timer", "timer", 0.40),
    ("what is the meaning of realism", "definition", 0.45),
    ("does life have meaning", "meaning_of_life", 0.70),
    ("i need help finding my mobile phone", "find_phone", 0.80),
    ("does ireland have any travel alerts i should be aware of", "travel_alert", 0.90),
]
SCORES = {utterance: score for utterance, _, score in UTTERANCES}
STUDENT_SETTINGS = {"student": {"serve_base_model": True}, "ood_threshold": 0.5}


class ScoringRouter:
    """Scores each request from a fixed table; the student serves scores <= the threshold
    and each student answer is shadowed by the teacher."""

    async def decide(self, policy: RoutePolicy, messages: list[dict[str, Any]]) -> Decision:
        score = SCORES.get(str(messages[-1]["content"]), 0.95)
        decision = decide_without_score(policy)
        if decision.target == "teacher" or policy.mode.value != "auto":
            decision.score = score
            return decision
        if score <= policy.ood_threshold:
            return Decision("student", score=score, reasons=["in distribution"], shadow=True)
        return Decision("teacher", score=score, reasons=["out of distribution"])


def _student_reply(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    usage = {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}
    if not body.get("stream"):
        return httpx.Response(200, json={
            "id": "cmpl-student", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": STUDENT_ANSWER},
                         "finish_reason": "stop"}],
            "usage": usage,
        })
    chunk = {"id": "cmpl-student", "object": "chat.completion.chunk", "created": int(time.time()),
             "model": body["model"]}
    events = [
        {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": STUDENT_ANSWER},
                               "finish_reason": None}]},
        {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**chunk, "choices": [], "usage": usage},
    ]
    payload = "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"
    return httpx.Response(200, content=payload.encode(), headers={"content-type": "text/event-stream"})


def operator_app(settings: Settings) -> Any:
    """A gateway app with the scoring router and the mock student."""
    student = VLLMStudent("http://student.test", transport=httpx.MockTransport(_student_reply))
    return create_app(settings, Components(student=student, router=ScoringRouter()))


def messages(utterance: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": utterance}]


def wait_for(predicate: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; returns its value or raises AssertionError."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(interval_s)


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``GET /metrics`` parsed: (sample name, labels) -> value."""
    response = httpx.get(f"{url}/metrics", headers=headers or {})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """Sum of a sample over every label set that includes ``labels``."""
    wanted = set(labels.items())
    return sum(value for (sample, label_set), value in samples.items() if sample == name and wanted <= label_set)
