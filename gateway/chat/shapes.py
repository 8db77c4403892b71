"""Upstream answers → OpenAI's exact shapes, under the route's name.

vLLM and litellm both add fields of their own; clients get OpenAI's shape and nothing else,
so a student-served and a teacher-served answer are indistinguishable but for our headers.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from core.tool_calls import parse_tool_calls

MESSAGE_KEYS = ("role", "content", "tool_calls", "refusal", "function_call")


def completion_id(request_id: str | None = None) -> str:
    """The completion's id; with the request's id in it, ``POST /v1/feedback`` takes it as is."""
    return f"chatcmpl-{request_id or uuid.uuid4().hex}"


def _message(raw: dict[str, Any]) -> dict[str, Any]:
    message = {key: raw.get(key) for key in MESSAGE_KEYS if raw.get(key) is not None}
    message.setdefault("role", "assistant")
    message.setdefault("content", None)
    message.setdefault("refusal", None)
    return message


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    upstream: dict[str, Any], route: str, prompt_tokens: int, completion_tokens: int, request_id: str | None = None
) -> dict[str, Any]:
    choices = [
        {
            "index": choice.get("index", index),
            "message": _message(choice.get("message") or {}),
            "logprobs": choice.get("logprobs"),
            "finish_reason": choice.get("finish_reason") or "stop",
        }
        for index, choice in enumerate(upstream.get("choices") or [])
    ]
    return {
        "id": completion_id(request_id),
        "object": "chat.completion",
        "created": int(upstream.get("created") or time.time()),
        "model": route,
        "choices": choices,
        "usage": usage_of(prompt_tokens, completion_tokens),
        "system_fingerprint": None,
    }


def _delta(raw: dict[str, Any]) -> dict[str, Any]:
    return {key: raw[key] for key in MESSAGE_KEYS if raw.get(key) is not None}


def chunk_body(
    upstream: dict[str, Any], route: str, chunk_id: str, created: int
) -> dict[str, Any] | None:
    """One ``chat.completion.chunk``; None for chunks that carry nothing for the client."""
    choices = [
        {
            "index": choice.get("index", 0),
            "delta": _delta(choice.get("delta") or {}),
            "logprobs": choice.get("logprobs"),
            "finish_reason": choice.get("finish_reason"),
        }
        for choice in upstream.get("choices") or []
    ]
    if not choices:
        return None
    return {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": route,
        "choices": choices,
        "system_fingerprint": None,
    }


def usage_chunk(route: str, chunk_id: str, created: int, usage: dict[str, int]) -> dict[str, Any]:
    return {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": route,
        "choices": [],
        "usage": usage,
        "system_fingerprint": None,
    }


def chunk_text(upstream: dict[str, Any]) -> str:
    choices = upstream.get("choices") or []
    if not choices:
        return ""
    return (choices[0].get("delta") or {}).get("content") or ""


def chunk_usage(upstream: dict[str, Any]) -> tuple[int, int] | None:
    usage = upstream.get("usage")
    if not usage:
        return None
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


async def completion_chunks(completion: Any) -> AsyncIterator[dict[str, Any]]:
    """A whole answer (``Completion``) replayed as upstream chunks: role, content (with the
    logprobs it still carries), tool calls, finish reason, usage. How a cascade-checked
    student answer is streamed."""
    choice = (completion.body.get("choices") or [{}])[0]
    message = choice.get("message") or {}

    def chunk(delta: dict[str, Any], logprobs: Any = None, finish_reason: str | None = None) -> dict[str, Any]:
        return {"choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}

    yield chunk({"role": "assistant", "content": ""})
    if message.get("content"):
        yield chunk({"content": message["content"]}, choice.get("logprobs"))
    if message.get("tool_calls"):
        yield chunk({"tool_calls": [{"index": index, **call} for index, call in enumerate(message["tool_calls"])]})
    yield chunk({}, finish_reason=choice.get("finish_reason") or "stop")
    yield {"choices": [], "usage": usage_of(completion.prompt_tokens, completion.completion_tokens)}


def answer_as_tool_calls(body: dict[str, Any], offered: set[str]) -> None:
    """A student's text answer that calls offered tools (core/tool_calls.py), rewritten in
    place as OpenAI's ``tool_calls`` with ``finish_reason: tool_calls``; other text stays."""
    for choice in body.get("choices") or []:
        message = choice.get("message") or {}
        calls = parse_tool_calls(message.get("content") or "", offered)
        if calls:
            choice["message"] = {**message, "content": None, "tool_calls": calls}
            choice["finish_reason"] = "tool_calls"
