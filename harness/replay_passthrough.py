"""The replay teacher's (a STAND-IN for a frontier API) legacy completions and embeddings.

``POST /v1/completions`` answers each prompt as the chat endpoint answers a user message
(the intent label, same accuracy knob); ``POST /v1/embeddings`` returns deterministic
hashed embeddings: each text's vector is a pure function of the text (SHA-256 counter
stream), unit length, so reruns and processes agree. Both count usage like the chat endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import struct
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.replay_teacher import ReplayTeacher, _error, answer_tokens, count_prompt_tokens

DEFAULT_DIMENSIONS = 64


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = ""
    # Token-id prompts are accepted as OpenAI does; the stand-in reads them as text.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=1)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = ""
    input: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    dimensions: int | None = Field(None, ge=1, le=4096)
    encoding_format: str = Field("float", pattern="^(float|base64)$")


def hashed_embedding(text: str, dimensions: int) -> list[float]:
    """A unit vector fixed by ``text`` alone: SHA-256 blocks read as signed 16-bit numbers."""
    values: list[float] = []
    counter = 0
    while len(values) < dimensions:
        block = hashlib.sha256(f"{counter}\x1f{text}".encode()).digest()
        values.extend(number / 32768 for number in struct.unpack("<16h", block))
        counter += 1
    vector = values[:dimensions]
    norm = math.sqrt(sum(value * value for value in vector)) or 1.0
    return [value / norm for value in vector]


def _encoded(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # what the openai SDK asks for by default: little-endian float32
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def _prompt_tokens(text: str) -> int:
    return count_prompt_tokens([{"content": text}]) - 7  # no chat message overhead


async def _wait_or_fail(teacher: ReplayTeacher) -> Any:
    delay = teacher.delay_s()
    if delay:
        await asyncio.sleep(delay)
    return teacher.injected_error()


def _texts(value: str | list[Any]) -> list[str]:
    """One text per prompt/input: a string, strings, or token ids (read as their digits)."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(item, int) for item in value):
        return [" ".join(map(str, value))]
    return [item if isinstance(item, str) else " ".join(map(str, item)) for item in value]


def add_passthrough_routes(app: FastAPI, teacher: ReplayTeacher) -> None:
    """Register ``/v1/completions`` and ``/v1/embeddings`` on the replay teacher's app."""

    @app.post("/v1/completions")
    async def completions(raw: Request) -> Any:
        try:
            request = CompletionRequest.model_validate(await raw.json())
        except (ValidationError, ValueError) as error:
            return _error(400, f"invalid request: {error}"[:500], "invalid_request_error", None)
        failure = await _wait_or_fail(teacher)
        if failure is not None:
            return failure
        prompts = _texts(request.prompt)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for index, prompt in enumerate(prompts):
            tokens = answer_tokens(teacher.book.answer(prompt, teacher.options.accuracy, teacher.options.seed))
            finish_reason = "stop"
            if request.max_tokens is not None and request.max_tokens < len(tokens):
                tokens, finish_reason = tokens[:request.max_tokens], "length"
            choices.append({"text": "".join(tokens), "index": index, "logprobs": None, "finish_reason": finish_reason})
            prompt_tokens += _prompt_tokens(prompt)
            completion_tokens += len(tokens)
        return {"id": f"cmpl-replay-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": request.model or teacher.options.model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    @app.post("/v1/embeddings")
    async def embeddings(raw: Request) -> Any:
        try:
            request = EmbeddingRequest.model_validate(await raw.json())
        except (ValidationError, ValueError) as error:
            return _error(400, f"invalid request: {error}"[:500], "invalid_request_error", None)
        failure = await _wait_or_fail(teacher)
        if failure is not None:
            return failure
        texts = _texts(request.input)
        dimensions = request.dimensions or DEFAULT_DIMENSIONS
        data = [{"object": "embedding", "index": index,
                 "embedding": _encoded(hashed_embedding(text, dimensions), request.encoding_format)}
                for index, text in enumerate(texts)]
        tokens = sum(_prompt_tokens(text) for text in texts)
        return {"object": "list", "data": data, "model": request.model or teacher.options.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
