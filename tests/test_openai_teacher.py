"""The httpx teacher client (OpenAITeacher): against the replay teacher through real sockets,
against ``httpx.MockTransport`` for an upstream's odd failures, and end to end through the
gateway under uvicorn with the official SDK as its client."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from core.config import Settings, TeacherConfig
from core.upstream import UpstreamFailure
from gateway import deadline
from gateway.app import create_app
from gateway.upstream.openai_teacher import OpenAITeacher
from tests.helpers import MESSAGES, UvicornThread, log_rows, sdk

ROUTE = "clinc-intents"
PRICES = {"input_per_mtok": 2.5, "output_per_mtok": 10.0}
BASE = "http://teacher.test/v1"


def config(**overrides: Any) -> TeacherConfig:
    return TeacherConfig.model_validate({"model": "openai/replay-teacher", "api_base": BASE, "max_retries": 2,
                                         "backoff_base_s": 0.001, "prices": PRICES, **overrides})


def completion(content: str = "transfer") -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion", "created": 1, "model": "replay-teacher",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}}


def chunk(content: str | None = None, finish_reason: str | None = None) -> bytes:
    delta = {"content": content} if content is not None else {}
    body = {"id": "s", "object": "chat.completion.chunk", "created": 1, "model": "replay-teacher",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    return f"data: {json.dumps(body)}\n\n".encode()


class Scripted:
    """A transport that answers each call with the next response (the last one repeats)."""

    def __init__(self, *answers: httpx.Response | Exception | Callable[[httpx.Request], Any]) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self._handle)

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return await answer(request)
        return answer

    def teacher(self, **overrides: Any) -> OpenAITeacher:
        return OpenAITeacher(config(**overrides), transport=self.transport)


def rate_limited(**headers: str) -> httpx.Response:
    error = {"error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": None}}
    return httpx.Response(429, json=error, headers=headers)


# -- through real sockets: the replay teacher ---------------------------------------------------
async def test_chat_against_the_replay_teacher(replay_teacher: str) -> None:
    teacher = OpenAITeacher(config(api_base=f"{replay_teacher}/v1"))
    try:
        answer = await teacher.chat({"messages": MESSAGES, "max_tokens": 8})
        assert await teacher.healthy()
    finally:
        await teacher.aclose()
    assert answer.text == "transfer" and answer.model == "openai/replay-teacher"
    assert answer.body["model"] == "replay-teacher", "sent without litellm's openai/ prefix"
    assert answer.prompt_tokens > 0 and answer.completion_tokens == 1
    assert answer.cost_usd == pytest.approx((answer.prompt_tokens * 2.5 + answer.completion_tokens * 10) / 1e6)


async def test_stream_against_the_replay_teacher(replay_teacher: str) -> None:
    teacher = OpenAITeacher(config(api_base=f"{replay_teacher}/v1"))
    try:
        chunks = [chunk async for chunk in teacher.stream({"messages": MESSAGES, "logprobs": True, "top_logprobs": 2})]
    finally:
        await teacher.aclose()
    text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
    assert text == "transfer"
    assert chunks[-1]["usage"]["completion_tokens"] == 1, "usage asked for and delivered on the last chunk"
    assert chunks[1]["choices"][0]["logprobs"]["content"][0]["token"] == "transfer", "the body went as is"
    assert teacher._slots._value == teacher.config.max_concurrency, "the stream gave its slot back"


# -- the wire: body, model, key ----------------------------------------------------------------
async def test_body_goes_as_is_with_the_configured_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEACHER_KEY", "sk-teacher")
    upstream = Scripted(httpx.Response(200, json=completion()))
    teacher = upstream.teacher(api_key_env="TEACHER_KEY", params={"temperature": 0, "seed": 1})
    await teacher.chat({"model": "clinc-intents", "messages": MESSAGES, "seed": 7, "vendor_field": {"x": 1}})
    sent = upstream.requests[0]
    assert str(sent.url) == f"{BASE}/chat/completions" and sent.headers["authorization"] == "Bearer sk-teacher"
    assert json.loads(sent.content) == {"model": "replay-teacher", "messages": MESSAGES, "temperature": 0,
                                        "seed": 7, "vendor_field": {"x": 1}, "stream": False}


async def test_without_api_base_it_is_openai_with_openai_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    upstream = Scripted(httpx.Response(200, json=completion()))
    teacher = upstream.teacher(model="openai/gpt-4.1-mini", api_base=None)
    await teacher.chat({"messages": MESSAGES})
    sent = upstream.requests[0]
    assert str(sent.url) == "https://api.openai.com/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer sk-openai" and json.loads(sent.content)["model"] == "gpt-4.1-mini"


async def test_cost_without_route_prices_comes_from_litellm_map_read_once() -> None:
    teacher = Scripted().teacher(model="openai/gpt-4o-mini", prices=None)
    assert teacher.cost(1_000_000, 0) > 0
    assert Scripted().teacher(model="openai/no-such-model", prices=None).cost(1000, 1000) == 0.0


# -- odd upstream failures (httpx.MockTransport) ------------------------------------------------
async def test_429_with_retry_after_is_waited_then_answered() -> None:
    upstream = Scripted(rate_limited(**{"retry-after-ms": "300"}), httpx.Response(200, json=completion()))
    started = time.monotonic()
    answer = await upstream.teacher().chat({"messages": MESSAGES})
    assert answer.text == "transfer" and len(upstream.requests) == 2
    assert time.monotonic() - started >= 0.3, "the provider's retry-after, not the 1 ms backoff"


async def test_429_with_a_retry_after_beyond_what_we_honour_goes_on_at_once() -> None:
    upstream = Scripted(rate_limited(**{"retry-after": "30"}))
    with pytest.raises(UpstreamFailure) as failed:
        await upstream.teacher(max_retry_after_s=5).chat({"messages": MESSAGES})
    assert (failed.value.status_code, failed.value.retry_after_s, len(upstream.requests)) == (429, 30.0, 1)
    assert "slow down" in str(failed.value), "the provider's message"


async def test_a_retry_after_past_the_request_deadline_is_not_waited() -> None:
    upstream = Scripted(rate_limited(**{"retry-after": "3"}))
    deadline.start(1.0)
    with pytest.raises(UpstreamFailure) as failed:
        await upstream.teacher().chat({"messages": MESSAGES})
    assert failed.value.status_code == 429 and len(upstream.requests) == 1


async def test_500_then_success() -> None:
    upstream = Scripted(httpx.Response(500, text="oops"), httpx.Response(200, json=completion()))
    assert (await upstream.teacher().chat({"messages": MESSAGES})).text == "transfer"
    assert len(upstream.requests) == 2


async def test_a_4xx_is_the_request_s_and_is_not_retried() -> None:
    error = {"error": {"message": "context too long", "type": "invalid_request_error", "param": None, "code": None}}
    upstream = Scripted(httpx.Response(400, json=error))
    with pytest.raises(UpstreamFailure) as failed:
        await upstream.teacher().chat({"messages": MESSAGES})
    assert (failed.value.status_code, failed.value.retryable, failed.value.server_fault) == (400, False, False)
    assert len(upstream.requests) == 1 and "context too long" in str(failed.value)


async def test_timeouts_are_retried_then_reported_as_a_timeout() -> None:
    upstream = Scripted(httpx.ReadTimeout("slow"))
    with pytest.raises(UpstreamFailure) as failed:
        await upstream.teacher().chat({"messages": MESSAGES})
    assert failed.value.timeout and failed.value.server_fault and len(upstream.requests) == 3


async def test_connection_refused_is_retried() -> None:
    upstream = Scripted(httpx.ConnectError("refused"), httpx.Response(200, json=completion()))
    assert (await upstream.teacher().chat({"messages": MESSAGES})).text == "transfer"


@pytest.mark.parametrize("body", [b"not json", b'{"object": "chat.completion"}', b"[1, 2]"])
async def test_a_malformed_answer_is_a_retryable_server_fault(body: bytes) -> None:
    upstream = Scripted(httpx.Response(200, content=body), httpx.Response(200, json=completion()))
    assert (await upstream.teacher().chat({"messages": MESSAGES})).text == "transfer"
    upstream = Scripted(httpx.Response(200, content=body))
    with pytest.raises(UpstreamFailure) as failed:
        await upstream.teacher(max_retries=0).chat({"messages": MESSAGES})
    assert failed.value.server_fault and failed.value.status_code is None


async def test_the_fallback_model_answers_on_its_own_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FALLBACK_KEY", "sk-fallback")

    async def by_host(request: httpx.Request) -> httpx.Response:
        if request.url.host == "fallback.test":
            return httpx.Response(200, json=completion("fallback says transfer"))
        return httpx.Response(503)

    upstream = Scripted(by_host)
    teacher = upstream.teacher(max_retries=1, fallback_model="openai/backup", fallback_api_base="http://fallback.test/v1",
                               fallback_api_key_env="FALLBACK_KEY")
    answer = await teacher.chat({"messages": MESSAGES})
    assert answer.model == "openai/backup" and answer.text == "fallback says transfer"
    assert [request.url.host for request in upstream.requests] == ["teacher.test", "teacher.test", "fallback.test"]
    assert json.loads(upstream.requests[-1].content)["model"] == "backup"
    assert upstream.requests[-1].headers["authorization"] == "Bearer sk-fallback"


async def test_concurrency_slots_and_queue_timeout() -> None:
    import asyncio

    release = asyncio.Event()

    async def held(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return httpx.Response(200, json=completion())

    teacher = Scripted(held).teacher(max_concurrency=1, queue_timeout_s=0.1)
    first = asyncio.create_task(teacher.chat({"messages": MESSAGES}))
    await asyncio.sleep(0.01)
    with pytest.raises(UpstreamFailure) as refused:
        await teacher.chat({"messages": MESSAGES})
    assert (refused.value.status_code, refused.value.retry_after_s) == (503, 1.0)
    release.set()
    assert (await first).text == "transfer"


def streamed(*parts: bytes, cut: Exception | None = None) -> httpx.Response:
    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part
        if cut is not None:
            raise cut

    return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})


async def test_stream_is_parsed_to_done_and_a_429_before_it_is_retried() -> None:
    upstream = Scripted(rate_limited(**{"retry-after-ms": "10"}),
                        streamed(b": keep-alive\n\n", chunk("trans"), chunk("fer"), chunk(finish_reason="stop"),
                                 b"data: [DONE]\n\n", chunk("after done, never read")))
    teacher = upstream.teacher()
    chunks = [c async for c in teacher.stream({"messages": MESSAGES})]
    assert [c["choices"][0]["delta"].get("content") for c in chunks] == ["trans", "fer", None]
    assert len(upstream.requests) == 2
    assert json.loads(upstream.requests[-1].content)["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("cut", [httpx.RemoteProtocolError("peer closed connection"), None])
async def test_a_stream_cut_mid_way_fails_after_what_it_sent(cut: Exception | None) -> None:
    upstream = Scripted(streamed(chunk("trans"), cut=cut))
    teacher = upstream.teacher()
    received = []
    with pytest.raises(UpstreamFailure) as failed:
        async for c in teacher.stream({"messages": MESSAGES}):
            received.append(c)
    assert len(received) == 1 and failed.value.retryable and failed.value.server_fault
    assert len(upstream.requests) == 1, "nothing is retried once chunks went out"
    assert teacher._slots._value == teacher.config.max_concurrency


async def test_an_error_event_in_the_stream_is_a_failure() -> None:
    upstream = Scripted(streamed(chunk("trans"), b'data: {"error": {"message": "overloaded"}}\n\n'))
    with pytest.raises(UpstreamFailure, match="overloaded"):
        [c async for c in upstream.teacher().stream({"messages": MESSAGES})]


# -- end to end: the gateway under uvicorn, the SDK as its client --------------------------------
def test_gateway_serves_through_the_httpx_teacher_to_the_openai_sdk(
        make_settings: Callable[..., Settings], replay_teacher: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLGATE_ADMIN_TOKEN", "admin-secret")
    settings = make_settings(replay_teacher, route={"mode": "teacher_only"})
    app = create_app(settings)
    with UvicornThread(app) as server:
        client = sdk(server.url)
        raw = client.chat.completions.with_raw_response.create(model=ROUTE, messages=MESSAGES, max_tokens=8)
        streamed_chunks = list(client.chat.completions.create(model=ROUTE, messages=MESSAGES, stream=True))
        described = httpx.get(f"{server.url}/admin/routes", headers={"authorization": "Bearer admin-secret"}).json()
        teacher = app.state.chat_service.teachers[ROUTE]
    answer = raw.parse()
    assert isinstance(teacher, OpenAITeacher)
    assert answer.choices[0].message.content == "transfer" and answer.usage is not None
    assert raw.headers["x-distillgate-target"] == "teacher"
    assert "".join(c.choices[0].delta.content or "" for c in streamed_chunks if c.choices) == "transfer"
    assert described["data"][0]["teacher_client"] == "httpx"
    rows = log_rows(settings, 2)
    assert all(row["status_code"] == 200 and row["teacher_model"] == "openai/replay-teacher" for row in rows)
    assert all(row["cost_usd"] > 0 for row in rows), "priced from the route's prices"
