"""One request's log row, filled in as the request is served."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def estimate_tokens(messages: list[dict[str, Any]]) -> int:
    """A rough token count (4 characters a token) for the all-teacher counterfactual cost of
    student-served requests, whose teacher prompt was never sent."""
    characters = sum(len(json.dumps(message.get("content"), ensure_ascii=False)) for message in messages)
    return max(1, characters // 4)


@dataclass
class RequestRecord:
    route: str
    request: dict[str, Any]
    stream: bool
    client_key_id: str | None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    target: str | None = None
    student_version: str | None = None
    router_score: float | None = None
    decision_reasons: list[str] = field(default_factory=list)
    fallback: bool = False
    status_code: int = 200
    error: str | None = None
    response: dict[str, Any] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    upstream_latency_ms: float | None = None
    cost_usd: float = 0.0
    teacher_cost_usd: float = 0.0
    teacher_model: str | None = None
    # Whether this row may become training data: the caller's key is trusted for training.
    train_trusted: bool = False
    # The key is over its monthly budget with ``over_budget: student_only``: no teacher call.
    student_only: bool = False
    # The student asked (the live version, or the canary for its share): set when routed to it.
    student_pointer: Any = field(default=None, repr=False)
    canary: bool = False
    # Applied to every logged string (the route's ``redact``); the live request is untouched.
    redact: Callable[[Any], Any] = field(default=lambda value: value, repr=False)

    def fail(self, status_code: int, error: str) -> None:
        self.status_code = status_code
        self.error = error

    def trace_attributes(self) -> dict[str, Any]:
        """What every span of this request carries (gateway/tracing.py drops the unset ones)."""
        return {"route": self.route, "target": self.target, "student_version": self.student_version,
                "request_id": self.id}

    def to_row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created_at": self.created_at,
            "route": self.route,
            "target": self.target,
            "student_version": self.student_version,
            "router_score": self.router_score,
            "decision_reasons": json.dumps(self.redact(self.decision_reasons)),  # may quote an upstream error
            "fallback": int(self.fallback),
            "stream": int(self.stream),
            "status_code": self.status_code,
            "error": self.redact(self.error) if self.error is not None else None,
            "request_json": json.dumps(self.redact(self.request), ensure_ascii=False),
            "response_json": (json.dumps(self.redact(self.response), ensure_ascii=False)
                              if self.response is not None else None),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_ms": (time.perf_counter() - self.started) * 1000,
            "upstream_latency_ms": self.upstream_latency_ms,
            "cost_usd": self.cost_usd,
            "teacher_cost_usd": self.teacher_cost_usd,
            "teacher_model": self.teacher_model,
            "client_key_id": self.client_key_id,
            "train_trusted": int(self.train_trusted),
        }
