"""Request-log rows as the gateway writes them, for benchmarks and tests of the trainer.

``bench/train.py`` seeds a store with a labelled dataset's answers as if a teacher had
given them, so a training cycle can run without serving traffic first.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from typing import Any

from core.store import Store

APP_SYSTEM_PROMPT = "You are the intent classifier of a bank's assistant. Answer with the intent label only."


def teacher_row(route: str, prompt: str, answer: str, *, created_at: float | None = None, status_code: int = 200,
                finish_reason: str = "stop", logprobs: list[dict[str, Any]] | None = None,
                target: str = "teacher", request_extra: dict[str, Any] | None = None,
                system_prompt: str | None = None, train_trusted: bool = True) -> dict[str, Any]:
    """One ``requests`` row: the app's request and the answer, from a key trusted for training.
    ``system_prompt`` (e.g. ``APP_SYSTEM_PROMPT``) adds the app's own system message."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    request = {"model": route, "messages": [*system, {"role": "user", "content": prompt}], **(request_extra or {})}
    choice = {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish_reason,
              "logprobs": {"content": logprobs} if logprobs is not None else None}
    response = {"object": "chat.completion", "model": "teacher", "choices": [choice]}
    return {"id": uuid.uuid4().hex, "created_at": created_at if created_at is not None else time.time(),
            "route": route, "target": target, "status_code": status_code,
            "error": None if status_code == 200 else "upstream error",
            "request_json": json.dumps(request), "response_json": json.dumps(response) if status_code == 200 else None,
            "stream": 0, "fallback": 0, "train_trusted": int(train_trusted)}


def seed_teacher_answers(store: Store, route: str, pairs: Iterable[tuple[str, str]], *,
                         start_at: float | None = None) -> int:
    """Log ``(prompt, answer)`` pairs as teacher-served requests; returns how many."""
    start = start_at if start_at is not None else time.time()
    rows = [teacher_row(route, prompt, answer, created_at=start + index * 1e-3)
            for index, (prompt, answer) in enumerate(pairs)]
    for offset in range(0, len(rows), 1000):
        store.insert_requests(rows[offset:offset + 1000])
    return len(rows)
