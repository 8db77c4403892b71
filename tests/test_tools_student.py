"""Tools through the student: teacher tool calls are training examples (the calls written as
JSON), the student's prompt carries the tools and tool turns, a student answer that calls an
offered tool comes back as OpenAI ``tool_calls``, and agreement compares function names plus
JSON-parsed arguments."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx

from core.answers import answers_agree
from core.config import Settings
from core.prompting import student_messages
from core.store import SQLiteStore
from core.tool_calls import parse_tool_calls, tool_calls_text
from gateway.app import Components, create_app
from gateway.upstream.student import VLLMStudent
from tests.helpers import UTTERANCE, UvicornThread, sdk, tool_calling_student
from trainer.dataset import collect_examples

TOOLS: Any = [{"type": "function", "function": {"name": "transfer", "description": "Move money",
                                                "parameters": {"type": "object"}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "transfer", "arguments": "{\"amount\": 20, \"to\": \"x\"}"}}


def test_tool_calls_round_trip_through_the_student_text() -> None:
    text = tool_calls_text([CALL])
    assert json.loads(text) == {"name": "transfer", "arguments": {"amount": 20, "to": "x"}}
    [parsed] = parse_tool_calls(text, {"transfer"}) or []
    assert parsed["function"]["name"] == "transfer" and json.loads(parsed["function"]["arguments"]) == {
        "amount": 20, "to": "x"}
    assert parse_tool_calls(text, {"other_tool"}) is None  # a tool the request did not offer stays text
    assert parse_tool_calls("transfer", {"transfer"}) is None
    two = tool_calls_text([CALL, CALL])
    assert len(parse_tool_calls(two, {"transfer"}) or []) == 2


def test_agreement_compares_names_and_parsed_arguments() -> None:
    teacher = tool_calls_text([CALL])
    assert answers_agree('{"arguments": {"to": "x", "amount": 20}, "name": "transfer"}', teacher)  # order, spacing
    assert not answers_agree('{"name": "transfer", "arguments": {"amount": 21, "to": "x"}}', teacher)
    assert not answers_agree('{"name": "balance", "arguments": {"amount": 20, "to": "x"}}', teacher)
    assert answers_agree("Transfer.", "transfer")  # plain answers are normalised as before


def test_student_prompt_carries_tools_calls_and_results() -> None:
    messages = [{"role": "system", "content": "long app prompt"}, {"role": "user", "content": "send 20 to x"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "done"}]
    prompt = student_messages("Route prompt.", messages, TOOLS)
    assert prompt[0]["role"] == "system" and prompt[0]["content"].startswith("Route prompt.\nTools: ")
    assert "long app prompt" not in prompt[0]["content"]
    assert prompt[2] == {"role": "assistant", "content": tool_calls_text([CALL])}
    assert prompt[3] == {"role": "tool", "content": "done"}


def test_teacher_tool_calls_become_training_examples(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings("http://127.0.0.1:9")
    store = SQLiteStore(settings.store.path)
    request = {"model": "clinc-intents", "messages": [{"role": "user", "content": "send 20 to x"}], "tools": TOOLS}
    response = {"choices": [{"index": 0, "finish_reason": "tool_calls",
                             "message": {"role": "assistant", "content": None, "tool_calls": [CALL]}}]}
    store.insert_requests([{"id": "r1", "created_at": 1.0, "route": "clinc-intents", "target": "teacher",
                            "status_code": 200, "request_json": json.dumps(request),
                            "response_json": json.dumps(response), "stream": 0, "fallback": 0,
                            "decision_reasons": "[]", "latency_ms": 1.0, "train_trusted": 1}])
    [example], dropped = collect_examples(store, settings.routes[0])
    assert not dropped
    assert example.answer == tool_calls_text([CALL])
    assert "Tools: " in example.messages[0]["content"] and example.messages[-1]["content"] == "send 20 to x"


def test_student_tool_calls_come_back_in_openai_shape(make_settings: Callable[..., Settings],
                                                      replay_teacher: str) -> None:
    settings = make_settings(replay_teacher, route={"mode": "student_only", "student": {"serve_base_model": True}})
    student = VLLMStudent("http://student.invalid", transport=httpx.MockTransport(tool_calling_student))
    with UvicornThread(create_app(settings, Components(student=student))) as server:
        client = sdk(server.url)
        plain = client.chat.completions.create(model="clinc-intents", tools=TOOLS,
                                               messages=[{"role": "user", "content": UTTERANCE}])
        chunks = list(client.chat.completions.create(model="clinc-intents", tools=TOOLS, stream=True,
                                                     messages=[{"role": "user", "content": UTTERANCE}]))
    choice = plain.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "transfer"
    assert json.loads(call.function.arguments) == {"amount": 20000}
    deltas = [tool for chunk in chunks if chunk.choices for tool in chunk.choices[0].delta.tool_calls or []]
    assert [(delta.function.name, json.loads(delta.function.arguments or "{}")) for delta in deltas] == [
        ("transfer", {"amount": 20000})]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_teacher_answers_must_match_the_requested_json_schema() -> None:
    from trainer.dataset import rejection_reason

    schema = {"type": "object", "properties": {"intent": {"type": "string"}}, "required": ["intent"],
              "additionalProperties": False}
    request = {"messages": [], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    assert rejection_reason(request, '{"intent": "transfer"}', "stop", None) is None
    assert rejection_reason(request, '{"label": "transfer"}', "stop", None) == "schema_invalid"
    assert rejection_reason(request, "transfer", "stop", None) == "invalid_json"
    assert rejection_reason({"messages": [], "response_format": {"type": "json_object"}}, '{"a": 1}', "stop",
                            None) is None
