"""The cascade through the gateway: the student answers with logprobs; a confident answer is
served (without logprobs the client did not ask for), an unsure one goes to the teacher."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import httpx

from core.config import Settings
from gateway.app import Components, create_app
from gateway.upstream.student import VLLMStudent
from router.decision import Decision, RoutePolicy
from tests.helpers import UTTERANCE, UvicornThread, completion_with_logprob, log_rows, sdk


class CascadeRouter:
    async def decide(self, policy: RoutePolicy, messages: list[dict[str, Any]]) -> Decision:
        return Decision("student", score=0.1, reasons=["test"], cascade=True)


def student_answer(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    assert body["logprobs"] is True  # the cascade asks for them
    unsure = "unsure" in body["messages"][-1]["content"] or body["messages"][-1]["content"] == UTTERANCE
    logprob = -2.0 if unsure else -0.01
    return completion_with_logprob(body["model"], logprob)


def ask_in_turn(settings: Settings, router: Any, contents: list[str],
                answer: Callable[[httpx.Request], httpx.Response] = student_answer) -> list[Any]:
    """Each prompt through the gateway (under uvicorn, ``router`` deciding, the mock student
    answering), as the SDK's raw responses."""
    student = VLLMStudent("http://student.invalid", transport=httpx.MockTransport(answer))
    with UvicornThread(create_app(settings, Components(student=student, router=router))) as server:
        client = sdk(server.url)
        return [client.chat.completions.with_raw_response.create(
            model="clinc-intents", messages=[{"role": "user", "content": content}]) for content in contents]


def test_confident_student_serves_and_unsure_goes_to_teacher(make_settings: Callable[..., Settings],
                                                              replay_teacher: str) -> None:
    settings = make_settings(replay_teacher, route={"confidence_threshold": -0.5,
                                                    "student": {"serve_base_model": True}})
    confident, unsure = ask_in_turn(settings, CascadeRouter(), ["sure thing", f"unsure {UTTERANCE}"])
    assert confident.headers["x-distillgate-target"] == "student"
    assert confident.parse().choices[0].message.content == "student-answer"
    assert confident.parse().choices[0].logprobs is None
    assert unsure.headers["x-distillgate-target"] == "teacher"
    rows = log_rows(settings, 2)
    reasons = [json.loads(row["decision_reasons"]) for row in rows]
    assert any("cascade: low student confidence" in reason for reason in reasons)
    teacher_row = next(row for row in rows if row["target"] == "teacher")
    assert teacher_row["cost_usd"] > teacher_row["teacher_cost_usd"]  # the discarded student answer cost too


def test_streamed_cascade_serves_confident_student_and_streams_teacher_when_unsure(
        make_settings: Callable[..., Settings], replay_teacher: str) -> None:
    settings = make_settings(replay_teacher, route={"confidence_threshold": -0.5,
                                                    "student": {"serve_base_model": True}})
    student = VLLMStudent("http://student.invalid", transport=httpx.MockTransport(student_answer))
    with UvicornThread(create_app(settings, Components(student=student, router=CascadeRouter()))) as server:
        client = sdk(server.url)
        with client.chat.completions.with_streaming_response.create(
                model="clinc-intents", messages=[{"role": "user", "content": "sure thing"}], stream=True,
                stream_options={"include_usage": True}) as confident:
            confident_target = confident.headers["x-distillgate-target"]
            confident_chunks = list(confident.parse())
        with client.chat.completions.with_streaming_response.create(
                model="clinc-intents", messages=[{"role": "user", "content": UTTERANCE}],
                stream=True) as unsure:
            unsure_target = unsure.headers["x-distillgate-target"]
            unsure_chunks = list(unsure.parse())
    assert confident_target == "student"
    assert "".join(c.choices[0].delta.content or "" for c in confident_chunks if c.choices) == "student-answer"
    assert all(c.choices[0].logprobs is None for c in confident_chunks if c.choices)  # the client did not ask
    assert confident_chunks[-1].usage is not None and confident_chunks[-1].usage.completion_tokens == 1
    assert unsure_target == "teacher"
    text = "".join(c.choices[0].delta.content or "" for c in unsure_chunks if c.choices)
    assert text == "transfer"  # one well-formed stream, all of it the teacher's
    assert [c.choices[0].finish_reason for c in unsure_chunks if c.choices].count("stop") == 1
    rows = log_rows(settings, 2)
    assert [(row["target"], row["stream"]) for row in rows] == [("student", 1), ("teacher", 1)]
    assert "cascade: low student confidence" in json.loads(rows[1]["decision_reasons"])
    assert json.loads(rows[0]["response_json"])["choices"][0]["message"]["content"] == "student-answer"


class ShadowingRouter:
    async def decide(self, policy: RoutePolicy, messages: list[dict[str, Any]]) -> Decision:
        return Decision("student", score=0.1, reasons=["test"], shadow=True)


def test_streamed_student_answers_are_shadowed(make_settings: Callable[..., Settings], replay_teacher: str) -> None:
    settings = make_settings(replay_teacher, route={"student": {"serve_base_model": True}})
    student = VLLMStudent("http://student.invalid", transport=httpx.MockTransport(streamed_student_answer))
    with UvicornThread(create_app(settings, Components(student=student, router=ShadowingRouter()))) as server:
        chunks = list(sdk(server.url).chat.completions.create(
            model="clinc-intents", messages=[{"role": "user", "content": UTTERANCE}], stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "student-answer"
        deadline = time.monotonic() + 10
        while not shadow_rows(settings) and time.monotonic() < deadline:
            time.sleep(0.05)
    [row] = shadow_rows(settings)
    assert (row["student_answer"], row["teacher_answer"], row["agree"]) == ("student-answer", "transfer", 0)
    assert row["served_by"] == "student"  # counted in the served agreement, what clients got


def streamed_student_answer(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    assert body["stream"] is True
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": "student-"}}]},
              {"choices": [{"index": 0, "delta": {"content": "answer"}, "finish_reason": "stop"}]},
              {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}]
    text = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
    return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


def shadow_rows(settings: Settings) -> list[dict[str, Any]]:
    with sqlite3.connect(settings.store.path) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute("select * from shadow_results")]


class NeighbourRouter:
    """The kNN detector's view: the nearest training prompts' teacher answers ride on the decision."""

    async def decide(self, policy: RoutePolicy, messages: list[dict[str, Any]]) -> Decision:
        from core.answers import answer_hash

        said = "student-answer" if "agreed" in messages[-1]["content"] else "something-else"
        return Decision("student", score=0.1, reasons=["test"], cascade=True,
                        neighbour_answers=(answer_hash(said),) * 5)


def test_a_confident_answer_its_neighbours_dispute_goes_to_the_teacher(make_settings: Callable[..., Settings],
                                                                       replay_teacher: str) -> None:
    settings = make_settings(replay_teacher, route={"confidence_threshold": -0.5,
                                                    "cascade": {"disagreement_penalty": 1.0},
                                                    "student": {"serve_base_model": True}})
    agreed, disputed = ask_in_turn(settings, NeighbourRouter(), ["agreed by the neighbours", f"disputed {UTTERANCE}"])
    assert agreed.headers["x-distillgate-target"] == "student"  # logprob -0.01, no dissent
    assert disputed.headers["x-distillgate-target"] == "teacher"  # same logprob, five dissents: -1.01
    reasons = [reason for row in log_rows(settings, 2) for reason in json.loads(row["decision_reasons"])]
    assert "cascade: score -1.010 < confidence_threshold -0.5" in reasons


def sure_or_out_of_scope(request: httpx.Request) -> httpx.Response:
    """A student sure of everything, that calls prompts with "elsewhere" out of scope."""
    body = json.loads(request.content)
    out_of_scope = "elsewhere" in body["messages"][-1]["content"]
    return completion_with_logprob(body["model"], -0.01, " OOS\n" if out_of_scope else "student-answer")


def test_an_answer_the_route_escalates_goes_to_the_teacher_however_sure(make_settings: Callable[..., Settings],
                                                                        replay_teacher: str) -> None:
    settings = make_settings(replay_teacher, route={"confidence_threshold": -0.5,
                                                    "cascade": {"escalate_answers": ["oos"]},
                                                    "student": {"serve_base_model": True}})
    kept, escalated = ask_in_turn(settings, CascadeRouter(), ["in scope", f"elsewhere {UTTERANCE}"],
                                  answer=sure_or_out_of_scope)
    assert kept.headers["x-distillgate-target"] == "student"
    assert escalated.headers["x-distillgate-target"] == "teacher"  # logprob -0.01, but the answer is "oos"
    assert escalated.parse().choices[0].message.content != " OOS\n"
    rows = log_rows(settings, 2)
    reasons = [reason for row in rows for reason in json.loads(row["decision_reasons"])]
    assert "cascade: answer 'OOS' is in escalate_answers" in reasons
    teacher_row = next(row for row in rows if row["target"] == "teacher")
    assert teacher_row["cost_usd"] > teacher_row["teacher_cost_usd"]  # the student's answer was paid for
