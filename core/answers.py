"""What an answer *is*, for comparison: one normaliser and one agreement function.

The shadow scorer (dashboard agreement), the promotion gate (holdout agreement), the demo
and the replay teacher's lookup all call these, so "agreement" is one number everywhere.
"""

from __future__ import annotations

import hashlib
import re

from core.tool_calls import tool_call_key

# Whitespace, sentence punctuation, quotes and brackets a model may wrap a label in.
SURROUNDING_PUNCTUATION = " \t\n\r.,!?;:'\"`()[]{}"
_THINK = re.compile(r"<think>.*?</think>\s*", re.DOTALL | re.IGNORECASE)


def normalize_answer(text: str) -> str:
    """Comparison key: single spaces, no surrounding punctuation or quotes, case-folded."""
    return " ".join(text.split()).strip(SURROUNDING_PUNCTUATION).casefold()


def strip_reasoning(text: str) -> str:
    """The answer without ``<think>…</think>`` reasoning (rationale targets; stripping at serving)."""
    return _THINK.sub("", text).strip()


def answer_key(text: str) -> str:
    """The final answer's comparison key: reasoning removed, then normalised; a tool-call
    answer is compared by function names and JSON-parsed arguments."""
    final = strip_reasoning(text)
    return tool_call_key(final) or normalize_answer(final)


def answers_agree(student_answer: str, teacher_answer: str) -> bool:
    """True when two answers say the same thing (the agreement every figure counts)."""
    return answer_key(student_answer) == answer_key(teacher_answer)


def answer_hash(text: str) -> int:
    """``answer_key`` as a signed 64-bit integer: how an OOD detector stores the teacher's
    answers beside its training prompts (compact, and the same in every process)."""
    digest = hashlib.blake2b(answer_key(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)
