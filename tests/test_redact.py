"""Redaction of e-mails, phone and card numbers from logged prompts: the SQLite row holds
``[EMAIL]`` etc.; the upstream request and the client's answer are unchanged."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from core.config import RedactConfig, Settings
from gateway.app import create_app
from gateway.redact import luhn_valid, redact_text
from tests.helpers import UvicornThread, log_rows, sdk

ALL = RedactConfig(emails=True, phones=True, cards=True)


@pytest.mark.parametrize(("text", "expected"), [
    ("mail jane.doe+bank@example.co.uk now", "mail [EMAIL] now"),
    ("card 4111 1111 1111 1111 expired", "card [CARD] expired"),
    ("card 4111-1111-1111-1111", "card [CARD]"),
    ("card 5500005555555559", "card [CARD]"),
    ("order 4111 1111 1111 1112 shipped", "order 4111 1111 1111 1112 shipped"),  # fails Luhn
    ("call +1 (415) 555-0132 today", "call [PHONE] today"),
    ("call 415.555.0132", "call [PHONE]"),
    ("ring 07700 900123", "ring [PHONE]"),
    ("ring 4155550132", "ring [PHONE]"),
    ("transfer $20000 from savings on 2024-05-01", "transfer $20000 from savings on 2024-05-01"),
    ("pin 1234, flight 12:30", "pin 1234, flight 12:30"),
])
def test_redact_text(text: str, expected: str) -> None:
    assert redact_text(text, ALL) == expected


def test_only_what_is_switched_on_is_redacted() -> None:
    text = "a@b.io 4111111111111111 +44 20 7946 0958"
    assert redact_text(text, RedactConfig(emails=True)) == "[EMAIL] 4111111111111111 +44 20 7946 0958"
    assert redact_text(text, RedactConfig(cards=True)) == "a@b.io [CARD] +44 20 7946 0958"
    assert redact_text(text, RedactConfig(phones=True)) == "a@b.io 4111111111111111 [PHONE]"
    assert luhn_valid("79927398713") and not luhn_valid("79927398710")


def test_logged_prompt_is_redacted_answer_is_not(make_settings: Callable[..., Settings], replay_teacher: str) -> None:
    # The replay teacher answers CLINC150 utterances by exact text: an unchanged answer
    # ("transfer") proves the teacher saw the prompt as sent.
    utterance = "transfer $20000 from my savings account to checking account"
    pii = " — jane@example.com, +1 415 555 0132, card 4111 1111 1111 1111"
    settings = make_settings(replay_teacher, route={"redact": {"emails": True, "phones": True, "cards": True}})
    with UvicornThread(create_app(settings)) as server:
        plain = sdk(server.url).chat.completions.create(
            model="clinc-intents", messages=[{"role": "user", "content": utterance}])
        mixed = sdk(server.url).chat.completions.create(
            model="clinc-intents", messages=[{"role": "system", "content": f"Customer{pii}"},
                                             {"role": "user", "content": [{"type": "text", "text": utterance}]}])
        rows = log_rows(settings, 2)
    assert plain.choices[0].message.content == mixed.choices[0].message.content == "transfer"
    logged = json.loads(rows[1]["request_json"])["messages"]
    assert logged[0]["content"] == "Customer — [EMAIL], [PHONE], card [CARD]"
    assert logged[1]["content"] == [{"type": "text", "text": utterance}]
    stored = settings.store.path.read_bytes() + b"".join(p.read_bytes() for p in settings.store.path.parent.rglob("*.jsonl"))
    assert b"jane@example.com" not in stored and b"4111 1111 1111 1111" not in stored


# -- every logged string field, secrets and IBANs (issue 13, item 11) -------------------------
SECRETS = {
    "openai_key": "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8t",
    "aws_key": "AKIAIOSFODNN7EXAMPLE",
    "iban": "DE89 3704 0044 0532 0130 00",
    "email": "jane.doe@example.com",
    "card": "4111 1111 1111 1111",
}
PII = ", ".join(SECRETS.values())
REDACTED = "[SECRET], [SECRET], [IBAN], [EMAIL], [CARD]"


@pytest.mark.parametrize(("text", "expected"), [
    ("key sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8t here", "key [SECRET] here"),
    ("aws AKIAIOSFODNN7EXAMPLE.", "aws [SECRET]."),
    ("gh ghp_0123456789abcdefghijABCDEFGHIJ012345", "gh [SECRET]"),
    ("pay DE89 3704 0044 0532 0130 00 now", "pay [IBAN] now"),
    ("pay GB82WEST12345698765432", "pay [IBAN]"),
    ("ref DE00 3704 0044 0532 0130 00", "ref DE00 3704 0044 0532 0130 00"),  # fails mod 97
    ("sk-short and a task-list", "sk-short and a task-list"),
])
def test_redact_secrets_and_ibans(text: str, expected: str) -> None:
    assert redact_text(text, RedactConfig(ibans=True)) == expected


def test_secrets_are_redacted_by_default() -> None:
    assert redact_text("use sk-live-0123456789abcdefXYZ", RedactConfig()) == "use [SECRET]"
    assert redact_text("use sk-live-0123456789abcdefXYZ", RedactConfig(secrets=False)) == "use sk-live-0123456789abcdefXYZ"


def _pii_teacher() -> Any:
    """A teacher that answers with personal data and secrets (and a tool call carrying them),
    and whose error message echoes the prompt, as some providers' do."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        if "FAIL" in prompt:
            return JSONResponse({"error": {"message": f"cannot process {prompt}", "type": "invalid_request_error"}},
                                status_code=400)
        message = {"role": "assistant", "content": f"Noted: {PII}",
                   "tool_calls": [{"id": "call_1", "type": "function", "function": {
                       "name": "lookup", "arguments": json.dumps({"email": SECRETS["email"], "iban": SECRETS["iban"]})}}]}
        return JSONResponse({"id": "x", "object": "chat.completion", "created": 1, "model": "pii",
                             "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}})

    return app


def _pii_student(request: Any) -> Any:
    import httpx

    return httpx.Response(200, json={
        "id": "s", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": f"student saw {PII}"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}})


def test_every_logged_string_is_redacted_and_never_trained_on(make_settings: Callable[..., Settings]) -> None:
    import httpx

    from core.store import SQLiteStore
    from gateway.app import Components
    from gateway.upstream.student import VLLMStudent
    from tests.operators import STUDENT_SETTINGS, ScoringRouter, wait_for
    from trainer.dataset import build_dataset

    conversation = [
        {"role": "user", "content": f"my details {PII}", "name": SECRETS["email"]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c0", "type": "function", "function": {
            "name": "save", "arguments": json.dumps({"note": PII})}}]},
        {"role": "tool", "tool_call_id": "c0", "content": PII},
    ]
    in_distribution = "transfer $20000 from my savings account to checking account"  # the student serves it
    with UvicornThread(_pii_teacher()) as teacher:
        settings = make_settings(teacher.url, route={
            **STUDENT_SETTINGS, "shadow_rate": 1.0, "training": {"holdout_fraction": 0.01},
            "redact": {"emails": True, "phones": True, "cards": True, "ibans": True}})
        student = VLLMStudent("http://student.test", transport=httpx.MockTransport(_pii_student))
        with UvicornThread(create_app(settings, Components(student=student, router=ScoringRouter()))) as server:
            client = sdk(server.url)
            answer = client.chat.completions.create(model="clinc-intents", messages=conversation,
                                                    user=SECRETS["email"], metadata={"ref": SECRETS["openai_key"]})
            client.chat.completions.create(model="clinc-intents", messages=[{"role": "user", "content": in_distribution}])
            failed = httpx.post(f"{server.url}/v1/chat/completions", json={
                "model": "clinc-intents", "messages": [{"role": "user", "content": f"FAIL {PII}"}]})
            rows = log_rows(settings, 3)
            store = SQLiteStore(settings.store.path)
            wait_for(lambda: store.query("select count(*) as n from shadow_results")[0]["n"] == 1)
    assert SECRETS["openai_key"] in answer.choices[0].message.content  # the client's answer is unchanged
    assert failed.status_code == 502 and len(rows) == 3
    request, response = json.loads(rows[0]["request_json"]), json.loads(rows[0]["response_json"])
    assert request["user"] == request["messages"][0]["name"] == "[EMAIL]"
    assert request["metadata"] == {"ref": "[SECRET]"}
    assert json.loads(request["messages"][1]["tool_calls"][0]["function"]["arguments"]) == {"note": REDACTED}
    assert request["messages"][0]["content"] == f"my details {REDACTED}" and request["messages"][2]["content"] == REDACTED
    answer_message = response["choices"][0]["message"]
    assert answer_message["content"] == f"Noted: {REDACTED}"
    assert json.loads(answer_message["tool_calls"][0]["function"]["arguments"]) == {"email": "[EMAIL]", "iban": "[IBAN]"}
    assert rows[2]["error"] and "[EMAIL]" in rows[2]["error"] and "[SECRET]" in rows[2]["error"]
    [shadow] = store.query("select * from shadow_results")
    # The teacher answered with a tool call too, so its comparable answer is the call (core/tool_calls.py).
    assert shadow["student_answer"] == f"student saw {REDACTED}"
    assert json.loads(shadow["teacher_answer"])["arguments"] == {"email": "[EMAIL]", "iban": "[IBAN]"}
    assert "[IBAN]" in shadow["teacher_response_json"]
    assert shadow["served_by"] == "student"  # the student served it, the teacher was asked after
    dataset = build_dataset(store, settings.routes[0])
    store.close()
    trained = json.dumps([(example.messages, example.answer) for example in dataset.train + dataset.holdout])
    assert "[EMAIL]" in trained  # the rows were trained on, redacted
    stored = settings.store.path.read_bytes() + b"".join(
        path.read_bytes() for path in settings.store.path.parent.rglob("*") if path.is_file())
    for secret in SECRETS.values():
        for haystack in (trained.encode(), stored, json.dumps(rows).encode()):
            assert secret.encode() not in haystack, secret
