"""Hostile input: property tests for the request validators (hypothesis), hand-made nasty
bodies through real uvicorn, and a client that disconnects mid-stream."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from core.config import Settings
from gateway.app import Components, create_app
from gateway.chat.endpoints import parse_chat_request, read_json_body
from gateway.chat.protocol import ChatCompletionRequest
from gateway.errors import GatewayError, InvalidRequest
from gateway.upstream.student import VLLMStudent
from tests.helpers import MESSAGES, UvicornThread, log_rows
from tests.operators import wait_for

ROUTE = "clinc-intents"
LIMIT = 4096

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
known_fields = st.sampled_from(["temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed",
                                "logprobs", "top_logprobs", "n", "stream", "stream_options", "tools", "messages",
                                "presence_penalty", "response_format", "user", "model", "unknown_field"])
requests = st.dictionaries(known_fields, json_values, max_size=4).map(
    lambda extra: {"model": ROUTE, "messages": MESSAGES, **extra})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_values, requests))
def test_parse_chat_request_accepts_or_raises_invalid_request(payload: Any) -> None:
    try:
        parsed = parse_chat_request(payload, max_tokens_limit=LIMIT)
    except InvalidRequest as error:
        assert error.status_code == 400 and error.message
        return
    assert isinstance(parsed, ChatCompletionRequest)
    body = parsed.upstream_body()
    json.dumps(body)  # what goes upstream and into the log must serialise
    assert all(value is None or value <= LIMIT for value in (parsed.max_tokens, parsed.max_completion_tokens))
    if isinstance(payload, dict) and payload.get("unknown_field") is not None:  # null means unset
        assert body["unknown_field"] == payload["unknown_field"], "unknown fields are passed on"


def _request(body: bytes, limit: int = LIMIT) -> Request:
    app = SimpleNamespace(state=SimpleNamespace(settings=SimpleNamespace(server=SimpleNamespace(max_body_bytes=limit))))
    chunks = [body[index:index + 1000] for index in range(0, len(body), 1000)] or [b""]

    async def receive() -> dict[str, Any]:
        chunk = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    return Request({"type": "http", "method": "POST", "headers": [], "app": app}, receive)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=6000), json_values.map(lambda value: json.dumps(value).encode())))
def test_read_json_body_returns_json_or_raises_a_gateway_error(body: bytes) -> None:
    try:
        payload = asyncio.run(read_json_body(_request(body)))
    except GatewayError as error:
        assert error.status_code in (400, 413)
        assert len(body) > LIMIT or error.status_code == 400
        return
    assert len(body) <= LIMIT
    json.dumps(payload, ensure_ascii=False).encode()  # anything accepted can be logged as UTF-8


@pytest.fixture(scope="module")
def gateway_url(replay_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from core.config import parse_settings

    settings = parse_settings({
        "store": {"path": str(tmp_path_factory.mktemp("hostile") / "log.db")},
        "vllm": {"url": "http://127.0.0.1:9", "launch": False},
        "routes": [{"name": ROUTE, "teacher": {"model": "openai/replay-teacher", "api_base": f"{replay_teacher}/v1",
                                               "max_retries": 0}}],
    })
    with UvicornThread(create_app(settings)) as server:
        yield server.url, settings


def _body(**fields: Any) -> bytes:
    return json.dumps({"model": ROUTE, "messages": MESSAGES, **fields}).encode()


@pytest.mark.parametrize(("content", "status"), [
    (b"[" * 100_000 + b"]" * 100_000, 400),  # deeply nested: a 400, not a RecursionError
    (_body()[:-1] + b', "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
    (b'{"model": "clinc-intents", "messages": [{"role": "user", "content": "\\ud800"}]}', 400),
    (b'{"model": "clinc-intents", "messages": [{"role": "user", "content": "\xc3\x28"}]}', 400),
    (_body(max_tokens=10**30), 400),
    (_body(max_tokens=-1), 400),
    (_body(temperature=-0.5), 400),
    (b'{"model": "clinc-intents", "messages": [{"role": "user", "content": "hi"}], "top_p": NaN}', 400),
    (b'{"model": "clinc-intents", "messages": [], "seed": ' + b"9" * 5000 + b"}", 400),
    (_body(top_logprobs=5), 400),
    (_body(stop=["a"] * 50), 400),
    (b"", 400),
    (b"{}" + b" " * 5_000_000, 413),
    (_body(unknown_field={"nested": [1, 2]}, seed=10**40), 200),
    (_body(messages=[{"role": "user", "content": "\U0001F600 \\ud83d\\ude00 a\x00b"}]), 200),
])
def test_nasty_bodies_get_openai_errors_never_5xx(gateway_url: tuple[str, Settings], content: bytes,
                                                  status: int) -> None:
    url, _ = gateway_url
    response = httpx.post(f"{url}/v1/chat/completions", content=content, timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == status, response.text[:300]
    if status != 200:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_unknown_fields_are_logged_and_passed_on(gateway_url: tuple[str, Settings]) -> None:
    url, settings = gateway_url
    response = httpx.post(f"{url}/v1/chat/completions", content=_body(vendor_option={"beam": 3}), timeout=30)
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    row = wait_for(lambda: next((row for row in log_rows(settings, 1) if row["id"] == request_id), None))
    assert json.loads(row["request_json"])["vendor_option"] == {"beam": 3}


class SlowStreamStudent:
    """A vLLM stand-in whose stream sends one chunk, then stalls."""

    def __call__(self, request: httpx.Request) -> httpx.Response:
        async def events() -> AsyncIterator[bytes]:
            chunk = {"choices": [{"index": 0, "delta": {"content": "trans"}, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
            await asyncio.sleep(5)
            yield b"data: [DONE]\n\n"

        return httpx.Response(200, content=events(), headers={"content-type": "text/event-stream"})


def test_client_disconnecting_mid_stream_is_logged_once_as_499(make_settings: Callable[..., Settings],
                                                               replay_teacher: str) -> None:
    settings = make_settings(replay_teacher, route={"mode": "student_only", "student": {"serve_base_model": True}})
    student = VLLMStudent("http://student.invalid", transport=httpx.MockTransport(SlowStreamStudent()))
    with UvicornThread(create_app(settings, Components(student=student))) as server:
        body = {"model": ROUTE, "messages": MESSAGES, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=10) as response:
            assert response.headers["x-distillgate-target"] == "student"
            first = next(line for line in response.iter_lines() if line.startswith("data:"))
            assert "trans" in first
        time.sleep(1.0)  # the server notices the closed connection and cleans up
        rows = log_rows(settings, 1)
    assert [(row["status_code"], row["target"]) for row in rows] == [(499, "student")]
    time.sleep(0.2)
    with sqlite3.connect(settings.store.path) as connection:
        assert connection.execute("select count(*) from requests").fetchone()[0] == 1
