"""Teacher faults through real replay teachers (the stand-in for a frontier API): injected
429/500s are retried a bounded number of times with backoff, then answered with a clean
OpenAI-format error; a configured fallback model (a second replay teacher) takes over. Each
test runs with both teacher clients: plain httpx and litellm."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from core.config import Settings
from gateway.app import create_app
from harness.replay_teacher import ReplayOptions, create_replay_app
from tests.helpers import MESSAGES, CountingApp, UvicornThread, log_rows, sdk

ROUTE = "clinc-intents"


@pytest.fixture
def teacher_with(clinc_path: Path) -> Iterator[Callable[..., tuple[str, CountingApp]]]:
    servers: list[UvicornThread] = []

    def start(**options: Any) -> tuple[str, CountingApp]:
        app = CountingApp(create_replay_app(ReplayOptions(dataset=clinc_path, retry_after_s=0, **options)))
        servers.append(UvicornThread(app).start())
        return servers[-1].url, app

    yield start
    for server in servers:
        server.stop()


def test_failing_teacher_is_retried_then_a_clean_openai_error(make_settings: Callable[..., Settings],
                                                              teacher_with: Callable[..., tuple[str, CountingApp]],
                                                              teacher_client: str) -> None:
    url, counter = teacher_with(error_rate=1.0, error_status=500)  # a 429 goes on as a 429: test_upstream_limits
    settings = make_settings(url, route={"teacher": {"max_retries": 2, "backoff_base_s": 0.01,
                                                         "client": teacher_client}})
    with UvicornThread(create_app(settings)) as server:
        for stream in (False, True):
            response = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                                  json={"model": ROUTE, "messages": MESSAGES, "stream": stream})
            assert response.status_code == 502
            assert response.json()["error"]["type"] == "upstream_error"
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        with pytest.raises(openai.InternalServerError):
            sdk(server.url).chat.completions.create(model=ROUTE, messages=MESSAGES)
    assert counter.calls == 3 * 3, "1 try + 2 retries per request, no hidden retries below"
    rows = log_rows(settings, 3)
    assert [row["status_code"] for row in rows] == [502] * 3


def test_flaky_teacher_is_retried_until_it_answers(make_settings: Callable[..., Settings],
                                                   teacher_with: Callable[..., tuple[str, CountingApp]],
                                                   teacher_client: str) -> None:
    url, counter = teacher_with(error_rate=0.4, seed=3)  # seeded: the same failures every run
    settings = make_settings(url, route={"teacher": {"max_retries": 6, "backoff_base_s": 0.005,
                                                         "client": teacher_client}})
    with UvicornThread(create_app(settings)) as server:
        client = sdk(server.url)
        answers = [client.chat.completions.create(model=ROUTE, messages=MESSAGES, stream=False)
                   .choices[0].message.content for _ in range(12)]
    assert answers == ["transfer"] * 12
    assert counter.calls > 12, "some calls failed and were retried"


def test_fallback_teacher_answers_when_the_main_one_fails(make_settings: Callable[..., Settings],
                                                          teacher_with: Callable[..., tuple[str, CountingApp]],
                                                          teacher_client: str) -> None:
    broken_url, broken = teacher_with(error_rate=1.0)
    healthy_url, healthy = teacher_with()
    settings = make_settings(broken_url, route={"teacher": {
        "max_retries": 1, "fallback_model": "openai/replay-fallback", "fallback_api_base": f"{healthy_url}/v1",
        "client": teacher_client}})
    with UvicornThread(create_app(settings)) as server:
        client = sdk(server.url)
        raw = client.chat.completions.with_raw_response.create(model=ROUTE, messages=MESSAGES)
        streamed = list(client.chat.completions.create(model=ROUTE, messages=MESSAGES, stream=True))
    assert raw.parse().choices[0].message.content == "transfer"
    assert raw.headers["x-distillgate-target"] == "teacher"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == "transfer"
    assert broken.calls == 2 * 2 and healthy.calls == 2
    rows = log_rows(settings, 2)
    assert all(row["status_code"] == 200 for row in rows)
    assert json.loads(rows[0]["response_json"])["choices"][0]["message"]["content"] == "transfer"
    assert rows[0]["teacher_model"] == "openai/replay-fallback"
