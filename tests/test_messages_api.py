"""``POST /v1/messages`` (Anthropic Messages) through real uvicorn, the official ``anthropic``
SDK and the replay teacher: served and logged like chat, stream and not, tools, and every
error in Anthropic's envelope."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import pytest

from core.config import Settings
from gateway.app import Components, create_app
from gateway.upstream.student import VLLMStudent
from tests.helpers import (
    UTTERANCE,
    UvicornThread,
    breaking_student,
    free_port,
    log_rows,
    tool_calling_student,
)

ROUTE = "clinc-intents"
ANTHROPIC_ERROR_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
                         "request_too_large", "rate_limit_error", "api_error", "overloaded_error", "timeout_error"}


def claude(url: str, api_key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=api_key, max_retries=0, timeout=30)


@pytest.fixture
def gateway(make_settings: Callable[..., Settings], replay_teacher: str) -> Iterator[tuple[str, Settings]]:
    settings = make_settings(replay_teacher)
    with UvicornThread(create_app(settings)) as server:
        yield server.url, settings


def test_message_is_served_and_logged_like_chat(gateway: tuple[str, Settings]) -> None:
    url, settings = gateway
    raw = claude(url).messages.with_raw_response.create(
        model=ROUTE, max_tokens=16, system="You label customer utterances.",
        messages=[{"role": "user", "content": [{"type": "text", "text": UTTERANCE}]}])
    message = raw.parse()
    assert (message.type, message.role, message.model, message.stop_reason) == ("message", "assistant", ROUTE,
                                                                               "end_turn")
    assert [block.type for block in message.content] == ["text"] and message.content[0].text == "transfer"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert raw.headers["x-distillgate-target"] == "teacher"
    [row] = log_rows(settings, 1)
    logged = json.loads(row["request_json"])
    assert logged["messages"] == [{"role": "system", "content": "You label customer utterances."},
                                  {"role": "user", "content": UTTERANCE}]
    assert logged["max_tokens"] == 16 and row["cost_usd"] > 0 and row["target"] == "teacher"


def test_tool_use_and_results_become_the_chat_conversation(gateway: tuple[str, Settings]) -> None:
    url, settings = gateway
    tools: Any = [{"name": "lookup", "description": "Look up", "input_schema": {"type": "object"}}]
    messages: Any = [
        {"role": "user", "content": "what can you do"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me check."},
                                          {"type": "tool_use", "id": "t1", "name": "lookup", "input": {"q": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "nothing"},
                                     {"type": "text", "text": UTTERANCE}]},
    ]
    message = claude(url).messages.create(model=ROUTE, max_tokens=16, messages=messages, tools=tools,
                                          tool_choice={"type": "auto"})
    assert message.content[0].text == "transfer"
    [row] = log_rows(settings, 1)
    logged = json.loads(row["request_json"])
    assert [m["role"] for m in logged["messages"]] == ["user", "assistant", "tool", "user"]
    assert logged["messages"][1]["tool_calls"][0]["function"] == {"name": "lookup", "arguments": "{\"q\": 1}"}
    assert logged["messages"][2] == {"role": "tool", "tool_call_id": "t1", "content": "nothing"}
    assert logged["tools"][0]["function"]["parameters"] == {"type": "object"} and logged["tool_choice"] == "auto"


def test_stream_events_and_accumulated_message(gateway: tuple[str, Settings]) -> None:
    url, settings = gateway
    events = list(claude(url).messages.create(model=ROUTE, max_tokens=16, stream=True,
                                              messages=[{"role": "user", "content": UTTERANCE}]))
    kinds = [event.type for event in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[1] == "content_block_start" and "content_block_stop" in kinds
    assert "".join(event.delta.text for event in events if event.type == "content_block_delta") == "transfer"
    assert events[-2].delta.stop_reason == "end_turn" and events[-2].usage.output_tokens > 0
    with claude(url).messages.stream(model=ROUTE, max_tokens=16,
                                     messages=[{"role": "user", "content": UTTERANCE}]) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == "transfer" and final.usage.input_tokens > 0
    assert [row["stream"] for row in log_rows(settings, 2)] == [1, 1]


def test_stream_sse_framing(gateway: tuple[str, Settings]) -> None:
    url, _ = gateway
    body = {"model": ROUTE, "max_tokens": 16, "stream": True, "messages": [{"role": "user", "content": UTTERANCE}]}
    with httpx.stream("POST", f"{url}/v1/messages", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        blocks = response.read().decode().strip().split("\n\n")
    for block in blocks:
        event_line, data_line = block.split("\n")
        assert json.loads(data_line.removeprefix("data: "))["type"] == event_line.removeprefix("event: ")


def assert_anthropic_error(response: httpx.Response, status: int, error_type: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == error_type in ANTHROPIC_ERROR_TYPES and body["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "error_type"),
    [
        ({"model": ROUTE, "messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_request_error"),
        ({"model": ROUTE, "max_tokens": 8, "messages": []}, 400, "invalid_request_error"),
        ({"model": ROUTE, "max_tokens": 8, "temperature": 1.5, "messages": [{"role": "user", "content": "hi"}]}, 400,
         "invalid_request_error"),
        ({"model": ROUTE, "max_tokens": 10**9, "messages": [{"role": "user", "content": "hi"}]}, 400,
         "invalid_request_error"),
        ({"model": ROUTE, "max_tokens": 8, "messages": [{"role": "system", "content": "hi"}]}, 400,
         "invalid_request_error"),
        ({"model": ROUTE, "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "document"}]}]}, 400,
         "invalid_request_error"),
        ({"model": "no-such-route", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}, 404,
         "not_found_error"),
    ],
)
def test_bad_requests_get_anthropic_errors(gateway: tuple[str, Settings], body: dict[str, Any], status: int,
                                           error_type: str) -> None:
    url, _ = gateway
    assert_anthropic_error(httpx.post(f"{url}/v1/messages", json=body), status, error_type)
    assert_anthropic_error(httpx.post(f"{url}/v1/messages", content=b"{oops",
                                      headers={"content-type": "application/json"}), 400, "invalid_request_error")


def test_sdk_raises_typed_errors(make_settings: Callable[..., Settings], replay_teacher: str,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLGATE_API_KEYS", "key-one")
    with UvicornThread(create_app(make_settings(replay_teacher))) as server:
        with pytest.raises(anthropic.AuthenticationError) as unauthorized:
            claude(server.url, api_key="wrong").messages.create(
                model=ROUTE, max_tokens=8, messages=[{"role": "user", "content": UTTERANCE}])
        with pytest.raises(anthropic.NotFoundError) as not_found:
            claude(server.url, api_key="key-one").messages.create(
                model="nope", max_tokens=8, messages=[{"role": "user", "content": UTTERANCE}])
        x_api_key = httpx.post(f"{server.url}/v1/messages", headers={"x-api-key": "key-one"}, json={
            "model": ROUTE, "max_tokens": 8, "messages": [{"role": "user", "content": UTTERANCE}]})
    assert unauthorized.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert not_found.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert x_api_key.status_code == 200 and x_api_key.json()["content"][0]["text"] == "transfer"


def test_teacher_unreachable_is_an_anthropic_api_error(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(f"http://127.0.0.1:{free_port()}")
    with UvicornThread(create_app(settings)) as server:
        response = httpx.post(f"{server.url}/v1/messages", json={
            "model": ROUTE, "max_tokens": 8, "messages": [{"role": "user", "content": UTTERANCE}]})
    assert_anthropic_error(response, 502, "api_error")


def test_student_tool_calls_come_back_as_tool_use_blocks(make_settings: Callable[..., Settings],
                                                         replay_teacher: str) -> None:
    settings = make_settings(replay_teacher, route={"mode": "student_only", "student": {"serve_base_model": True}})
    student = VLLMStudent("http://student.invalid", transport=httpx.MockTransport(tool_calling_student))
    tools: Any = [{"name": "transfer", "description": "Move money",
                   "input_schema": {"type": "object", "properties": {"amount": {"type": "number"}}}}]
    with UvicornThread(create_app(settings, Components(student=student))) as server:
        client = claude(server.url)
        plain = client.messages.create(model=ROUTE, max_tokens=16, tools=tools,
                                       messages=[{"role": "user", "content": UTTERANCE}])
        with client.messages.stream(model=ROUTE, max_tokens=16, tools=tools,
                                    messages=[{"role": "user", "content": UTTERANCE}]) as stream:
            streamed = stream.get_final_message()
    for message in (plain, streamed):
        assert message.stop_reason == "tool_use"
        [block] = message.content
        assert (block.type, block.name, block.input) == ("tool_use", "transfer", {"amount": 20000})
        assert block.id.startswith("call_")


def test_other_methods_and_paths_answer_in_anthropic_shape(gateway: tuple[str, Settings]) -> None:
    url, _ = gateway
    assert_anthropic_error(httpx.get(f"{url}/v1/messages"), 405, "invalid_request_error")
    assert_anthropic_error(httpx.post(f"{url}/v1/messages/batches", json={}), 404, "not_found_error")


def test_a_stream_broken_mid_answer_ends_with_an_anthropic_error_event(make_settings: Callable[..., Settings],
                                                                      replay_teacher: str) -> None:
    settings = make_settings(replay_teacher, route={"mode": "student_only", "student": {"serve_base_model": True}})
    student = VLLMStudent("http://student.invalid", transport=httpx.MockTransport(breaking_student))
    with UvicornThread(create_app(settings, Components(student=student))) as server:
        stream = claude(server.url).messages.create(model=ROUTE, max_tokens=8, stream=True,
                                                    messages=[{"role": "user", "content": UTTERANCE}])
        with pytest.raises(anthropic.APIStatusError) as broken:
            list(stream)
    assert broken.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    [row] = log_rows(settings, 1)
    assert row["status_code"] == 502
