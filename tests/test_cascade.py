"""The cascade through the gateway: the student answers with logprobs; a confident answer is
served (without logprobs the client did not ask for), an unsure one goes to the teacher."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx

from core.config import Settings
from gateway.app import Components, create_app
from gateway.upstream.student import VLLMStudent
from router.decision import Decision, RoutePolicy
from tests.helpers import UTTERANCE, UvicornThread, log_rows, sdk


class CascadeRouter:
    async def decide(self, policy: RoutePolicy, messages: list[dict[str, Any]]) -> Decision:
        return Decision("student", score=0.1, reasons=["test"], cascade=True)


def student_answer(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    assert body["logprobs"] is True  # the cascade asks for them
    unsure = "unsure" in body["messages"][-1]["content"]
    logprob = -2.0 if unsure else -0.01
    return httpx.Response(200, json={
        "id": "x", "object": "chat.completion", "created": 1, "model": body["model"],
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "student-answer"},
                     "logprobs": {"content": [{"token": "student-answer", "logprob": logprob, "bytes": None,
                                               "top_logprobs": []}]}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    })


def test_confident_student_serves_and_unsure_goes_to_teacher(make_settings: Callable[..., Settings],
                                                              replay_teacher: str) -> None:
    settings = make_settings(replay_teacher, route={"confidence_threshold": -0.5,
                                                    "student": {"serve_base_model": True}})
    student = VLLMStudent("http://student.invalid", transport=httpx.MockTransport(student_answer))
    with UvicornThread(create_app(settings, Components(student=student, router=CascadeRouter()))) as server:
        client = sdk(server.url)
        confident = client.chat.completions.with_raw_response.create(
            model="clinc-intents", messages=[{"role": "user", "content": "sure thing"}])
        unsure = client.chat.completions.with_raw_response.create(
            model="clinc-intents", messages=[{"role": "user", "content": f"unsure {UTTERANCE}"}])
    assert confident.headers["x-distillgate-target"] == "student"
    assert confident.parse().choices[0].message.content == "student-answer"
    assert confident.parse().choices[0].logprobs is None
    assert unsure.headers["x-distillgate-target"] == "teacher"
    rows = log_rows(settings, 2)
    reasons = [json.loads(row["decision_reasons"]) for row in rows]
    assert any("cascade: low student confidence" in reason for reason in reasons)
    teacher_row = next(row for row in rows if row["target"] == "teacher")
    assert teacher_row["cost_usd"] > teacher_row["teacher_cost_usd"]  # the discarded student answer cost too
