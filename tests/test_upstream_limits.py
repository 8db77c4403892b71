"""Upstream limits through real servers on loopback: a provider's retry-after is honoured and
a teacher 429 reaches the client as a 429 with retry-after (not a 502); concurrent teacher
calls are capped; each request has an overall deadline, streams included. The teacher's
tests run with both teacher clients (plain httpx, litellm)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from core.config import Settings
from gateway.app import create_app
from gateway.upstream.teacher import retry_after_s
from harness.replay_teacher import ReplayOptions, create_replay_app
from tests.helpers import MESSAGES, CountingApp, UvicornThread, log_rows, sdk

ROUTE = "clinc-intents"
CHAT = {"model": ROUTE, "messages": MESSAGES}


@pytest.fixture
def teacher_with(clinc_path: Path) -> Iterator[Callable[..., tuple[str, CountingApp]]]:
    servers: list[UvicornThread] = []

    def start(**options: Any) -> tuple[str, CountingApp]:
        app = CountingApp(create_replay_app(ReplayOptions(dataset=clinc_path, **options)))
        servers.append(UvicornThread(app).start())
        return servers[-1].url, app

    yield start
    for server in servers:
        server.stop()


def test_retry_after_header_forms() -> None:
    assert retry_after_s({"retry-after": "3"}) == 3.0
    assert retry_after_s({"Retry-After-Ms": "1500", "retry-after": "2"}) == 1.5
    assert 55 < retry_after_s({"retry-after": _http_date(60)}) <= 60  # type: ignore[operator]
    assert retry_after_s({"retry-after": "soon"}) is None and retry_after_s(None) is None


def _http_date(seconds_ahead: float) -> str:
    import email.utils

    return email.utils.formatdate(time.time() + seconds_ahead, usegmt=True)


def test_teacher_429_honours_retry_after_then_reaches_the_client_as_429(
        make_settings: Callable[..., Settings], teacher_with: Callable[..., tuple[str, CountingApp]],
        teacher_client: str) -> None:
    url, counter = teacher_with(error_rate=1.0, error_status=429, retry_after_s=1)
    settings = make_settings(url, route={"teacher": {"max_retries": 2, "backoff_base_s": 0.01, "client": teacher_client}})
    with UvicornThread(create_app(settings)) as server:
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as limited:
            sdk(server.url).chat.completions.create(**CHAT)
        elapsed = time.monotonic() - started
        streamed = httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30)
    assert elapsed >= 2.0, "two retries, each after the provider's retry-after of 1 s (backoff alone is ~10 ms)"
    assert counter.calls == 2 * 3
    assert limited.value.status_code == 429 and limited.value.response.headers["retry-after"] == "1"
    assert limited.value.body["type"] == "rate_limit_error"  # type: ignore[index]
    assert streamed.status_code == 429 and streamed.headers["retry-after"] == "1"
    assert [row["status_code"] for row in log_rows(settings, 2)] == [429, 429]


def test_a_retry_after_longer_than_we_honour_is_passed_on_at_once(
        make_settings: Callable[..., Settings], teacher_with: Callable[..., tuple[str, CountingApp]],
        teacher_client: str) -> None:
    url, counter = teacher_with(error_rate=1.0, error_status=429, retry_after_s=30)
    settings = make_settings(url, route={"teacher": {"max_retries": 3, "max_retry_after_s": 5,
                                                          "client": teacher_client}})
    with UvicornThread(create_app(settings)) as server:
        started = time.monotonic()
        response = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=30)
    assert time.monotonic() - started < 3 and counter.calls == 1
    assert response.status_code == 429 and response.headers["retry-after"] == "30"


def test_concurrent_teacher_calls_are_capped(make_settings: Callable[..., Settings],
                                             teacher_with: Callable[..., tuple[str, CountingApp]],
                                             teacher_client: str) -> None:
    url, counter = teacher_with(latency_ms=3000)  # long enough that all three overlap on a loaded machine
    settings = make_settings(url, route={"teacher": {"max_concurrency": 1, "queue_timeout_s": 0.3,
                                                          "client": teacher_client}})
    with UvicornThread(create_app(settings)) as server, concurrent.futures.ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda _: httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=30),
                                  range(3)))
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200, 503, 503] and counter.calls == 1
    refused = next(response for response in responses if response.status_code == 503)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "service_unavailable"


def _slow_stream_teacher() -> FastAPI:
    """A teacher whose stream sends one chunk, then stalls."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat() -> StreamingResponse:
        async def events() -> Any:
            chunk = {"id": "s", "object": "chat.completion.chunk", "created": 1, "model": "slow",
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": "trans"},
                                  "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n"
            await asyncio.sleep(20)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def test_every_request_has_an_overall_deadline_streams_included(
        make_settings: Callable[..., Settings], teacher_with: Callable[..., tuple[str, CountingApp]],
        teacher_client: str) -> None:
    slow_url, _ = teacher_with(latency_ms=5000)
    with UvicornThread(_slow_stream_teacher()) as stalling:
        for url, stream in ((slow_url, False), (slow_url, True), (stalling.url, True)):
            settings = make_settings(url, server={"request_timeout_s": 1.0},
                                     route={"teacher": {"timeout_s": 30, "max_retries": 0,
                                                        "client": teacher_client}})
            with UvicornThread(create_app(settings)) as server:
                started = time.monotonic()
                response = httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "stream": stream}, timeout=30)
                elapsed = time.monotonic() - started
                rows = log_rows(settings, 1)
            assert elapsed < 4, (url, stream, elapsed)  # a 1 s deadline against a 5 s or 20 s upstream
            if url == stalling.url:  # the stream was under way: its first chunk, then an error event
                assert response.status_code == 200 and '"content":"trans"' in response.text
                assert '"type":"upstream_timeout"' in response.text and "[DONE]" not in response.text
            else:
                assert response.status_code == 504 and response.json()["error"]["type"] == "upstream_timeout"
            assert rows[0]["status_code"] == 504
