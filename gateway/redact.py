"""Redaction of personal data and secrets from everything the gateway logs (a route's ``redact``).

Applied to every string value of the logged row — the request (messages, ``user``, ``name``,
tool-call arguments, any other field), the answer, the error text — and of shadow rows,
before the row is spooled or stored; so what is redacted is never trained on either. Never
applied to what is sent upstream or answered: the teacher and the student see the prompt as
the client sent it, and the client's answer is unchanged.

* secrets (on by default): API keys such as ``sk-…`` (OpenAI, Anthropic), ``AKIA…``/``ASIA…``
  (AWS access key ids), ``ghp_…``/``github_pat_…`` (GitHub), ``AIza…`` (Google), ``xox?-…``
  (Slack) → ``[SECRET]``
* IBANs: two letters, two check digits, 11-30 letters or digits (spaces allowed in groups of
  four), passing the ISO 13616 mod-97 check → ``[IBAN]``
* e-mail addresses → ``[EMAIL]``
* card numbers: 13-19 digits, spaces or dashes allowed between them, that pass the Luhn
  check → ``[CARD]`` (a digit run that fails Luhn is left alone: order numbers, amounts)
* phone numbers: an optional ``+country`` prefix and 7-15 digits in groups separated by
  spaces, dots or dashes, the last group of 3-6 digits (so ``2024-05-01`` stays a date), or
  one unbroken run of 10-15 digits → ``[PHONE]``

Secrets and IBANs go first (their digits must not be half-taken as a phone number), then
cards, so a card number is never half-taken as a phone number either.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from core.config import RedactConfig

SECRET = re.compile(
    r"(?<![\w-])(?:sk-[A-Za-z0-9_-]{16,}|(?:AKIA|ASIA)[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_\w{30,}"
    r"|AIza[0-9A-Za-z_-]{35}|xox[abposr]-[A-Za-z0-9-]{10,})(?![\w-])"
)
IBAN = re.compile(r"(?<![\w-])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![\w-])")
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


def iban_valid(iban: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters to 10..35, mod 97 is 1."""
    compact = iban.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group())
    return "[CARD]" if 13 <= len(digits) <= 19 and luhn_valid(digits) else match.group()


def _phone(match: re.Match[str]) -> str:
    digits = sum(char.isdigit() for char in match.group())
    return "[PHONE]" if 7 <= digits <= 15 else match.group()


def _iban(match: re.Match[str]) -> str:
    return "[IBAN]" if iban_valid(match.group()) else match.group()


Substitution = tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]


def _substitutions(config: RedactConfig) -> list[Substitution]:
    chosen: list[tuple[bool, Substitution]] = [
        (config.secrets, (SECRET, "[SECRET]")),
        (config.ibans, (IBAN, _iban)),
        (config.emails, (EMAIL, "[EMAIL]")),
        (config.cards, (CARD, _card)),
        (config.phones, (PHONE, _phone)),
    ]
    return [substitution for enabled, substitution in chosen if enabled]


def redact_text(text: str, config: RedactConfig) -> str:
    return Redactor(config).text(text)


class Redactor:
    """One route's redaction, compiled once; ``value`` walks any JSON-like structure."""

    def __init__(self, config: RedactConfig) -> None:
        self._substitutions = _substitutions(config)

    @property
    def enabled(self) -> bool:
        return bool(self._substitutions)

    def text(self, text: str) -> str:
        for pattern, replacement in self._substitutions:
            text = pattern.sub(replacement, text)
        return text

    def value(self, value: Any) -> Any:
        """A copy with every string redacted (dict keys kept: they are field names)."""
        if not self._substitutions:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {key: self.value(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(item) for item in value]
        return value


def redact_request(body: dict[str, Any], config: RedactConfig) -> dict[str, Any]:
    """A copy of the request body with every string field redacted (the body is not touched)."""
    return Redactor(config).value(body)
