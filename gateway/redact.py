"""Redaction of personal data from logged prompts (a route's ``redact`` option).

Applied to the copy of the request that is logged (and so trained on), never to what is
sent upstream: the teacher and the student see the prompt as the client sent it, and the
client's answer is unaffected. Answers are logged as they came back.

* e-mail addresses → ``[EMAIL]``
* card numbers: 13-19 digits, spaces or dashes allowed between them, that pass the Luhn
  check → ``[CARD]`` (a digit run that fails Luhn is left alone: order numbers, amounts)
* phone numbers: an optional ``+country`` prefix and 7-15 digits in groups separated by
  spaces, dots or dashes, the last group of 3-6 digits (so ``2024-05-01`` stays a date), or
  one unbroken run of 10-15 digits → ``[PHONE]``

Cards go first so a card number is never half-taken as a phone number.
"""

from __future__ import annotations

import re
from typing import Any

from core.config import RedactConfig

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,5}(?:[ .-]\d{2,5}){0,3}[ .-]\d{3,6}(?![\w-])"
    r"|(?<![\w+])\+?\d{10,15}(?!\w)"
)


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group())
    return "[CARD]" if 13 <= len(digits) <= 19 and luhn_valid(digits) else match.group()


def _phone(match: re.Match[str]) -> str:
    digits = sum(char.isdigit() for char in match.group())
    return "[PHONE]" if 7 <= digits <= 15 else match.group()


def redact_text(text: str, config: RedactConfig) -> str:
    if config.emails:
        text = EMAIL.sub("[EMAIL]", text)
    if config.cards:
        text = CARD.sub(_card, text)
    if config.phones:
        text = PHONE.sub(_phone, text)
    return text


def _redact_content(content: Any, config: RedactConfig) -> Any:
    if isinstance(content, str):
        return redact_text(content, config)
    if isinstance(content, list):  # content parts: only text parts carry prose
        return [{**part, "text": redact_text(part["text"], config)}
                if isinstance(part, dict) and isinstance(part.get("text"), str) else part for part in content]
    return content


def redact_request(body: dict[str, Any], config: RedactConfig) -> dict[str, Any]:
    """A copy of the request body with every message's content redacted (the body is not touched)."""
    if not config.enabled:
        return body
    messages = [{**message, "content": _redact_content(message.get("content"), config)}
                if isinstance(message, dict) else message for message in body.get("messages", [])]
    return {**body, "messages": messages}
