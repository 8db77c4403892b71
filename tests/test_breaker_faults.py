"""The student breaker counts only the server's faults: client input (a prompt longer than
the student's context, an unloaded adapter's 404, any 4xx) and the gateway's own full
connection pool never open it for everyone; half-open admits one trial request."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from core.config import Settings
from gateway.app import Components, create_app
from gateway.route_table import StudentPointer
from gateway.upstream.student import VLLMStudent
from tests.helpers import MESSAGES, UvicornThread, log_rows, sdk
from tests.operators import scrape, total, wait_for

ROUTE = "clinc-intents"
BREAKER = {"failure_threshold": 3, "probe_interval_s": 0.1, "probe_timeout_s": 1.0}
STUDENT_ROUTE = {"mode": "student_only", "student": {"serve_base_model": True}}
LONG = [{"role": "user", "content": "transfer money to my checking account " * 200}]


def _completion(content: str = "transfer") -> httpx.Response:
    return httpx.Response(200, json={
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1}})


class ScriptedStudent:
    """A vLLM stand-in: answers chats with ``status`` (or a completion), counts calls."""

    def __init__(self, status: int = 200, delay_s: float = 0.0) -> None:
        self.status, self.delay_s = status, delay_s
        self.chats = 0
        self.tokenize_calls = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        if request.url.path == "/tokenize":
            self.tokenize_calls += 1
            body = json.loads(request.content)
            return httpx.Response(200, json={"count": sum(len(m["content"].split()) for m in body["messages"]),
                                             "max_model_len": 512})
        if json.loads(request.content)["messages"][-1]["content"] != "ping":  # not the breaker's probe
            self.chats += 1
        await asyncio.sleep(self.delay_s)  # on the gateway's loop: other requests go on
        if self.status != 200:
            return httpx.Response(self.status, json={"error": {"message": "nope", "type": "BadRequestError"}})
        return _completion()


def _app(settings: Settings, handler: Callable[[httpx.Request], Any], **student: Any) -> Any:
    transport = httpx.MockTransport(handler)
    return create_app(settings, Components(student=VLLMStudent("http://student.invalid", transport=transport,
                                                               **student)))


def _breaker(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/readyz").json()["checks"]["student"]["breaker"]


@pytest.mark.parametrize("status", [400, 404, 422])
def test_client_errors_never_open_the_breaker(make_settings: Callable[..., Settings], replay_teacher: str,
                                              status: int) -> None:
    settings = make_settings(replay_teacher, route=STUDENT_ROUTE, vllm={"breaker": BREAKER})
    student = ScriptedStudent(status)
    with UvicornThread(_app(settings, student)) as server:
        for _ in range(8):
            raw = sdk(server.url).chat.completions.with_raw_response.create(model=ROUTE, messages=MESSAGES)
            assert raw.headers["x-distillgate-target"] == "teacher"
        breaker = _breaker(server.url)
    assert student.chats == 8, "every request still tried the student: the breaker stayed closed"
    assert breaker["state"] == "closed" and breaker["consecutive_failures"] == 0
    assert breaker["ignored_failures"] == 8


def test_server_errors_still_open_it(make_settings: Callable[..., Settings], replay_teacher: str) -> None:
    settings = make_settings(replay_teacher, route=STUDENT_ROUTE, vllm={"breaker": BREAKER})
    student = ScriptedStudent(503)
    with UvicornThread(_app(settings, student)) as server:
        for _ in range(6):
            sdk(server.url).chat.completions.create(model=ROUTE, messages=MESSAGES)
        assert _breaker(server.url)["state"] == "open"
    assert student.chats == 3


def test_a_full_connection_pool_is_not_a_server_fault() -> None:
    from core.upstream import UpstreamFailure

    def pool_full(request: httpx.Request) -> httpx.Response:
        raise httpx.PoolTimeout("no connection available", request=request)

    async def call() -> UpstreamFailure:
        student = VLLMStudent("http://student.invalid", transport=httpx.MockTransport(pool_full))
        try:
            await student.chat("base", {"messages": MESSAGES}, 1.0)
        except UpstreamFailure as failure:
            return failure
        finally:
            await student.aclose()
        raise AssertionError("no failure")

    failure = asyncio.run(call())
    assert failure.server_fault is False and UpstreamFailure("x", status_code=502).server_fault is True


def test_a_prompt_too_long_for_the_student_goes_to_the_teacher_without_a_student_call(
        make_settings: Callable[..., Settings], replay_teacher: str) -> None:
    settings = make_settings(replay_teacher, route=STUDENT_ROUTE, vllm={"breaker": BREAKER})
    student = ScriptedStudent()
    with UvicornThread(_app(settings, student, max_model_len=512)) as server:
        client = sdk(server.url)
        for stream in (False, True, False, False):
            raw = client.chat.completions.with_raw_response.create(model=ROUTE, messages=LONG, stream=stream)
            assert raw.headers["x-distillgate-target"] == "teacher"
            assert "x-distillgate-fallback" not in raw.headers
        short = client.chat.completions.with_raw_response.create(model=ROUTE, messages=MESSAGES)
        assert short.headers["x-distillgate-target"] == "student"
        assert _breaker(server.url)["state"] == "closed"
    assert student.chats == 1 and student.tokenize_calls == 4
    rows = log_rows(settings, 5)
    assert sum("prompt_exceeds_student_context" in row["decision_reasons"] for row in rows) == 4


def test_half_open_admits_one_trial_request(make_settings: Callable[..., Settings], replay_teacher: str) -> None:
    settings = make_settings(replay_teacher, route=STUDENT_ROUTE, vllm={"breaker": BREAKER})
    student = ScriptedStudent(503)
    with UvicornThread(_app(settings, student)) as server:
        for _ in range(3):
            sdk(server.url).chat.completions.create(model=ROUTE, messages=MESSAGES)
        assert _breaker(server.url)["state"] == "open"
        student.status, student.delay_s = 200, 1.5  # back, but slow: the trial is still running
        wait_for(lambda: total(scrape(server.url), "distillgate_student_breaker_state") == 1, timeout_s=5)
        chats_before = student.chats
        targets: list[str] = []

        def one() -> None:
            raw = sdk(server.url).chat.completions.with_raw_response.create(model=ROUTE, messages=MESSAGES)
            targets.append(raw.headers["x-distillgate-target"])

        threads = [threading.Thread(target=one) for _ in range(4)]
        for thread in threads:
            thread.start()
            time.sleep(0.1)
        for thread in threads:
            thread.join(timeout=20)
        assert sorted(targets) == ["student", "teacher", "teacher", "teacher"]
        assert student.chats - chats_before == 1
        assert _breaker(server.url)["state"] == "closed"


@pytest.mark.integration
def test_real_vllm_client_faults_keep_the_breaker_closed(make_settings: Callable[..., Settings],
                                                          replay_teacher: str, vllm_server: Any) -> None:
    """Against the real vLLM: prompts longer than its max_model_len are counted (``/tokenize``)
    and sent to the teacher, an unloaded adapter's 404 falls back; neither opens the breaker,
    and the student serves the next ordinary request."""
    settings = make_settings(replay_teacher, student_url=vllm_server.url, vllm={"breaker": BREAKER},
                             route={**STUDENT_ROUTE, "student": {"serve_base_model": True, "timeout_s": 30}})
    app = create_app(settings)
    with UvicornThread(app) as server:
        client = sdk(server.url)
        assert app.state.student.max_model_len == 512
        for _ in range(4):
            raw = client.chat.completions.with_raw_response.create(model=ROUTE, messages=LONG, max_tokens=4)
            assert raw.headers["x-distillgate-target"] == "teacher"
        app.state.routes.switch_student(ROUTE, StudentPointer("v9", f"{ROUTE}@v9"))  # never loaded: 404
        for _ in range(4):
            raw = client.chat.completions.with_raw_response.create(model=ROUTE, messages=MESSAGES, max_tokens=4)
            assert raw.headers["x-distillgate-fallback"] == "true"
        assert _breaker(server.url)["state"] == "closed"
        app.state.routes.switch_student(ROUTE, StudentPointer("base", "base"))
        raw = client.chat.completions.with_raw_response.create(model=ROUTE, messages=MESSAGES, max_tokens=4)
        assert raw.headers["x-distillgate-target"] == "student"
        breaker = _breaker(server.url)
    assert breaker["consecutive_failures"] == 0 and breaker["ignored_failures"] == 4
    rows = log_rows(settings, 9)
    assert sum("prompt_exceeds_student_context" in row["decision_reasons"] for row in rows) == 4
