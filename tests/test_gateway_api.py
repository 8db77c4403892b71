"""The OpenAI surface through real uvicorn, the official SDK and the replay teacher."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from core.config import Settings
from gateway.app import Components, create_app
from gateway.upstream.student import VLLMStudent
from tests.helpers import MESSAGES, UvicornThread, failing_student, free_port, log_rows, sdk


@pytest.fixture
def gateway(make_settings: Callable[..., Settings], replay_teacher: str) -> Iterator[tuple[str, Settings]]:
    settings = make_settings(replay_teacher)
    with UvicornThread(create_app(settings)) as server:
        yield server.url, settings


def test_non_stream_completion_has_openai_shape_and_headers(gateway: tuple[str, Settings]) -> None:
    url, settings = gateway
    raw = sdk(url).chat.completions.with_raw_response.create(model="clinc-intents", messages=MESSAGES,
                                                             temperature=0, max_tokens=8, seed=1, user="u1")
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == "clinc-intents"
    assert completion.choices[0].message.content == "transfer"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens > 0
    assert raw.headers["x-distillgate-route"] == "clinc-intents"
    assert raw.headers["x-distillgate-target"] == "teacher"  # cold start: no student yet
    assert raw.headers["x-distillgate-student-version"] == "none"
    [row] = log_rows(settings, 1)
    assert row["target"] == "teacher" and row["status_code"] == 200
    assert row["cost_usd"] > 0 and row["cost_usd"] == pytest.approx(row["teacher_cost_usd"])
    assert json.loads(row["response_json"])["choices"][0]["message"]["content"] == "transfer"


def test_stream_sends_chunks_then_usage_then_done(gateway: tuple[str, Settings]) -> None:
    url, settings = gateway
    stream = sdk(url).chat.completions.create(model="clinc-intents", messages=MESSAGES, stream=True,
                                              stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" and chunk.model == "clinc-intents" for chunk in chunks)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "transfer"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    with httpx.stream("POST", f"{url}/v1/chat/completions",
                      json={"model": "clinc-intents", "messages": MESSAGES, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert not any('"usage"' in line for line in lines), "usage only when stream_options asks for it"
    rows = log_rows(settings, 2)
    assert [row["stream"] for row in rows] == [1, 1]
    assert all(row["status_code"] == 200 and row["completion_tokens"] > 0 for row in rows)


def test_models_lists_routes(gateway: tuple[str, Settings]) -> None:
    url, _ = gateway
    models = sdk(url).models.list()
    assert [model.id for model in models.data] == ["clinc-intents"]
    assert sdk(url).models.retrieve("clinc-intents").id == "clinc-intents"


@pytest.mark.parametrize(
    ("content", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"\xff\xfe\x00", 400, None),
        (b"[1, 2]", 400, None),
        (json.dumps({"model": "clinc-intents"}).encode(), 400, "messages"),
        (json.dumps({"model": "clinc-intents", "messages": MESSAGES, "temperature": 5}).encode(), 400, "temperature"),
        (json.dumps({"model": "clinc-intents", "messages": MESSAGES, "n": 2}).encode(), 400, "n"),
        (json.dumps({"model": "clinc-intents", "messages": MESSAGES, "max_tokens": 10**9}).encode(), 400,
         "max_tokens"),
        (json.dumps({"model": "clinc-intents", "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400,
         "messages.0.role"),
        (json.dumps({"model": "no-such-route", "messages": MESSAGES}).encode(), 404, "model"),
        (b"{" + b" " * 2_000_000 + b"}", 413, None),
    ],
)
def test_bad_requests_get_openai_errors(gateway: tuple[str, Settings], content: bytes, status: int,
                                        param: str | None) -> None:
    url, _ = gateway
    response = httpx.post(f"{url}/v1/chat/completions", content=content,
                          headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["param"] == param


def test_sdk_raises_typed_errors(gateway: tuple[str, Settings]) -> None:
    url, _ = gateway
    with pytest.raises(openai.NotFoundError) as not_found:
        sdk(url).chat.completions.create(model="nope", messages=MESSAGES)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        sdk(url).chat.completions.create(model="clinc-intents", messages=[])
    with pytest.raises(openai.NotFoundError):
        sdk(url).models.retrieve("nope")
    unknown_path = httpx.get(f"{url}/v1/nowhere")
    assert unknown_path.status_code == 404 and unknown_path.json()["error"]["type"] == "invalid_request_error"


def test_client_keys_are_required_when_configured(make_settings: Callable[..., Settings], replay_teacher: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLGATE_API_KEYS", "key-one, key-two")
    with UvicornThread(create_app(make_settings(replay_teacher))) as server:
        with pytest.raises(openai.AuthenticationError):
            sdk(server.url, api_key="wrong").chat.completions.create(model="clinc-intents", messages=MESSAGES)
        response = httpx.get(f"{server.url}/v1/models")
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
        ok = sdk(server.url, api_key="key-two").chat.completions.create(model="clinc-intents", messages=MESSAGES)
        assert ok.choices[0].message.content == "transfer"


def test_teacher_unreachable_is_502_and_logged(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(f"http://127.0.0.1:{free_port()}")
    with UvicornThread(create_app(settings)) as server:
        with pytest.raises(openai.InternalServerError) as failure:
            sdk(server.url).chat.completions.create(model="clinc-intents", messages=MESSAGES)
    assert failure.value.status_code == 502
    [row] = log_rows(settings, 1)
    assert row["status_code"] == 502 and row["error"]


def test_teacher_timeout_is_504(make_settings: Callable[..., Settings], clinc_path: Any) -> None:
    from harness.replay_teacher import ReplayOptions, create_replay_app

    slow_teacher = create_replay_app(ReplayOptions(dataset=clinc_path, latency_ms=3000))
    with UvicornThread(slow_teacher) as teacher:
        settings = make_settings(teacher.url, route={"teacher": {"timeout_s": 0.3, "max_retries": 0}})
        with UvicornThread(create_app(settings)) as server:
            with pytest.raises(openai.APIStatusError) as failure:
                sdk(server.url).chat.completions.create(model="clinc-intents", messages=MESSAGES)
    assert failure.value.status_code == 504


def test_student_failure_is_served_by_teacher(make_settings: Callable[..., Settings], replay_teacher: str) -> None:
    settings = make_settings(replay_teacher, route={"mode": "student_only", "student": {"serve_base_model": True}})
    student = VLLMStudent("http://student.invalid", transport=httpx.MockTransport(failing_student))
    with UvicornThread(create_app(settings, Components(student=student))) as server:
        raw = sdk(server.url).chat.completions.with_raw_response.create(model="clinc-intents", messages=MESSAGES)
        stream = list(sdk(server.url).chat.completions.create(model="clinc-intents", messages=MESSAGES, stream=True))
    assert raw.parse().choices[0].message.content == "transfer"
    assert raw.headers["x-distillgate-target"] == "teacher"
    assert raw.headers["x-distillgate-fallback"] == "true"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "transfer"
    rows = log_rows(settings, 2)
    assert [(row["target"], row["fallback"], row["status_code"]) for row in rows] == [("teacher", 1, 200)] * 2


def test_one_log_row_per_request(gateway: tuple[str, Settings]) -> None:
    url, settings = gateway
    client = sdk(url)
    for index in range(20):
        client.chat.completions.create(model="clinc-intents", messages=MESSAGES, stream=index % 2 == 0)
    rows = log_rows(settings, 20)
    assert len(rows) == 20 and len({row["id"] for row in rows}) == 20


def test_health_and_readiness(gateway: tuple[str, Settings]) -> None:
    url, _ = gateway
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["checks"]["store"]["ok"] and body["checks"]["teachers"]["clinc-intents"]["ok"]
    assert body["checks"]["student"]["ok"] is False  # nothing listens on the student URL here
