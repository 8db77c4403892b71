"""Redaction of e-mails, phone and card numbers from logged prompts: the SQLite row holds
``[EMAIL]`` etc.; the upstream request and the client's answer are unchanged."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

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
