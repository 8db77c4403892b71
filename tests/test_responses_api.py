"""``POST /v1/responses`` through real uvicorn, the official SDK and the replay teacher:
served, logged and trained like chat; stream and not; tool calls; OpenAI's errors."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from core.config import Settings
from core.store import SQLiteStore
from gateway.app import Components, create_app
from gateway.upstream.student import VLLMStudent
from tests.helpers import UTTERANCE, UvicornThread, log_rows, sdk, tool_calling_student
from trainer.dataset import collect_examples

ROUTE = "clinc-intents"


@pytest.fixture
def gateway(make_settings: Callable[..., Settings], replay_teacher: str) -> Iterator[tuple[str, Settings]]:
    # The app's instructions are a client system prompt: trained on only when the route says so.
    settings = make_settings(replay_teacher, route={"training": {"client_system_prompts": "replace"}})
    with UvicornThread(create_app(settings)) as server:
        yield server.url, settings


def test_string_input_is_served_logged_and_trained_like_chat(gateway: tuple[str, Settings]) -> None:
    url, settings = gateway
    raw = sdk(url).responses.with_raw_response.create(model=ROUTE, input=UTTERANCE,
                                                      instructions="You label customer utterances.",
                                                      max_output_tokens=16, temperature=0)
    response = raw.parse()
    assert response.object == "response" and response.status == "completed" and response.model == ROUTE
    assert response.output_text == "transfer"
    assert response.output[0].type == "message" and response.output[0].content[0].type == "output_text"
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens > 0
    assert raw.headers["x-distillgate-target"] == "teacher" and raw.headers["x-distillgate-route"] == ROUTE
    [row] = log_rows(settings, 1)
    logged = json.loads(row["request_json"])
    assert logged["messages"] == [{"role": "system", "content": "You label customer utterances."},
                                  {"role": "user", "content": UTTERANCE}]
    assert logged["max_tokens"] == 16 and row["cost_usd"] > 0
    examples, _ = collect_examples(SQLiteStore(settings.store.path), settings.routes[0])
    assert [(example.prompt_text, example.answer) for example in examples] == [(UTTERANCE, "transfer")]


def test_input_items_become_the_chat_conversation(gateway: tuple[str, Settings]) -> None:
    url, settings = gateway
    items: list[Any] = [
        {"role": "developer", "content": "Label utterances."},
        {"role": "user", "content": [{"type": "input_text", "text": "what can you do"}]},
        {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{\"q\": 1}"},
        {"type": "function_call_output", "call_id": "c1", "output": "nothing"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
        {"role": "user", "content": UTTERANCE},
    ]
    response = sdk(url).responses.create(model=ROUTE, input=items)
    assert response.output_text == "transfer"
    [row] = log_rows(settings, 1)
    messages = json.loads(row["request_json"])["messages"]
    assert [message["role"] for message in messages] == ["developer", "user", "assistant", "tool", "assistant", "user"]
    assert messages[2]["tool_calls"][0]["function"] == {"name": "lookup", "arguments": "{\"q\": 1}"}
    assert messages[3] == {"role": "tool", "tool_call_id": "c1", "content": "nothing"}


def test_stream_events_and_final_response(gateway: tuple[str, Settings]) -> None:
    url, settings = gateway
    events = list(sdk(url).responses.create(model=ROUTE, input=UTTERANCE, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert "".join(event.delta for event in events if event.type == "response.output_text.delta") == "transfer"
    assert events[-1].response.output_text == "transfer" and events[-1].response.usage.output_tokens > 0
    with sdk(url).responses.stream(model=ROUTE, input=UTTERANCE) as stream:
        final = stream.get_final_response()
    assert final.output_text == "transfer" and final.status == "completed"
    rows = log_rows(settings, 2)
    assert [(row["stream"], row["status_code"]) for row in rows] == [(1, 200), (1, 200)]


def test_stream_sse_framing_names_every_event(gateway: tuple[str, Settings]) -> None:
    url, _ = gateway
    with httpx.stream("POST", f"{url}/v1/responses",
                      json={"model": ROUTE, "input": UTTERANCE, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        blocks = response.read().decode().strip().split("\n\n")
    for block in blocks:
        event_line, data_line = block.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        assert json.loads(data_line[6:])["type"] == event_line[7:]
    assert not any("[DONE]" in block for block in blocks)  # the Responses API ends on response.completed


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": ROUTE}, 400, "input"),
        ({"model": ROUTE, "input": UTTERANCE, "temperature": 9}, 400, "temperature"),
        ({"model": ROUTE, "input": UTTERANCE, "max_output_tokens": 10**9}, 400, "max_output_tokens"),
        ({"model": ROUTE, "input": UTTERANCE, "previous_response_id": "resp_1"}, 400, "previous_response_id"),
        ({"model": ROUTE, "input": [{"role": "wizard", "content": "x"}]}, 400, "input.0.role"),
        ({"model": ROUTE, "input": [{"type": "file_search_call"}]}, 400, "input.0.type"),
        ({"model": ROUTE, "input": UTTERANCE, "tools": [{"type": "web_search"}]}, 400, "tools.0"),
        ({"model": "no-such-route", "input": UTTERANCE}, 404, "model"),
    ],
)
def test_bad_requests_get_openai_errors(gateway: tuple[str, Settings], body: dict[str, Any], status: int,
                                        param: str) -> None:
    url, _ = gateway
    response = httpx.post(f"{url}/v1/responses", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param


def test_sdk_raises_typed_errors(gateway: tuple[str, Settings]) -> None:
    url, _ = gateway
    with pytest.raises(openai.NotFoundError) as not_found:
        sdk(url).responses.create(model="nope", input=UTTERANCE)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        sdk(url).responses.create(model=ROUTE, input=UTTERANCE, previous_response_id="resp_1")


def test_student_tool_calls_come_back_as_function_call_items(make_settings: Callable[..., Settings],
                                                             replay_teacher: str) -> None:
    settings = make_settings(replay_teacher, route={"mode": "student_only", "student": {"serve_base_model": True}})
    student = VLLMStudent("http://student.invalid", transport=httpx.MockTransport(tool_calling_student))
    tools: Any = [{"type": "function", "name": "transfer", "description": "Move money",
                   "parameters": {"type": "object", "properties": {"amount": {"type": "number"}}}}]
    with UvicornThread(create_app(settings, Components(student=student))) as server:
        plain = sdk(server.url).responses.create(model=ROUTE, input=UTTERANCE, tools=tools)
        events = list(sdk(server.url).responses.create(model=ROUTE, input=UTTERANCE, tools=tools, stream=True))
    [call] = plain.output
    assert (call.type, call.name, json.loads(call.arguments)) == ("function_call", "transfer", {"amount": 20000})
    assert call.call_id.startswith("call_")
    streamed = events[-1].response.output
    assert [(item.type, item.name, json.loads(item.arguments)) for item in streamed] == [
        ("function_call", "transfer", {"amount": 20000})]
    assert "response.function_call_arguments.done" in [event.type for event in events]
    rows = log_rows(settings, 2)
    logged = json.loads(rows[1]["response_json"])["choices"][0]["message"]["tool_calls"]
    assert logged[0]["function"]["name"] == "transfer" and json.loads(logged[0]["function"]["arguments"]) == {
        "amount": 20000}


def test_a_stream_broken_mid_answer_ends_with_error_and_failed(make_settings: Callable[..., Settings],
                                                               replay_teacher: str) -> None:
    from tests.helpers import breaking_student

    settings = make_settings(replay_teacher, route={"mode": "student_only", "student": {"serve_base_model": True}})
    student = VLLMStudent("http://student.invalid", transport=httpx.MockTransport(breaking_student))
    with UvicornThread(create_app(settings, Components(student=student))) as server:
        events = list(sdk(server.url).responses.create(model=ROUTE, input=UTTERANCE, stream=True))
    assert [event.type for event in events[-2:]] == ["error", "response.failed"]
    assert events[-1].response.status == "failed" and events[-1].response.error.message
    assert [row["status_code"] for row in log_rows(settings, 1)] == [502]
