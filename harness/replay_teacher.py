"""The replay teacher: a STAND-IN for a frontier API, for offline tests, demos and benchmarks.

No frontier API can be reached from this project's machines, so this small OpenAI-compatible
server answers chat completions (and legacy completions and embeddings, see
``harness/replay_passthrough.py``) from a labelled dataset (CLINC150 format: an object of
splits, each a list of ``[utterance, intent]``). The answer is the intent name for the last
user message's text; an utterance it has never seen is answered ``oos`` (out of scope).

Knobs that make it behave like a real provider:

* latency: ``latency_ms`` is the mean delay before the answer starts (time to first token);
  with ``latency_jitter_ms`` > 0 each delay is drawn from a **lognormal** distribution with
  that mean and standard deviation (always positive, right-skewed like real API latency).
* ``error_rate``: that share of calls fails, half with a 500 and half with a 429 that
  carries ``retry-after`` (seconds) and ``retry-after-ms``, both in OpenAI's error format;
  ``error_status`` (500 or 429) makes every injected error that one.
* ``accuracy``: an utterance is answered with a wrong label with probability
  ``1 - accuracy``. Whether it is wrong, and which wrong label, is a pure function of
  ``(seed, utterance)`` so reruns reproduce the same teacher mistakes.
* usage: token counts are a deterministic approximation (word/punctuation pieces plus a
  per-message overhead, like OpenAI's chat format), so cost accounting is exercised.
* ``logprobs``/``top_logprobs``: a plausible per-token ``logprobs.content`` for the answer.
* tools: a request that offers ``tools`` is answered with OpenAI ``tool_calls`` that call the
  tool named after the utterance's intent (``harness/replay_tools.py``: ``tool_choice``,
  arguments, out-of-scope utterances).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import random
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.answers import normalize_answer
from core.prompting import content_text, user_text
from harness.replay_tools import decide_call, offered_functions, tool_calls_answer

logger = logging.getLogger(__name__)

OUT_OF_SCOPE = "oos"
OWNED_BY = "distillgate-replay-teacher (stand-in for a frontier API)"


class ReplayOptions(BaseModel):
    """How the replay teacher (a stand-in for a frontier API) behaves."""

    model_config = ConfigDict(extra="forbid")

    dataset: Path
    model_name: str = "replay-teacher"
    latency_ms: float = Field(0.0, ge=0)
    latency_jitter_ms: float = Field(0.0, ge=0)
    error_rate: float = Field(0.0, ge=0, le=1)
    accuracy: float = Field(1.0, ge=0, le=1)
    retry_after_s: float = Field(1.0, ge=0)
    error_status: Literal[429, 500] | None = None
    seed: int = 0


class ChatRequest(BaseModel):
    """The fields the replay teacher reads; other OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str = ""
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None


def _unit_hash(*parts: object) -> float:
    """A number in [0, 1) that depends only on ``parts`` (stable across processes)."""
    digest = hashlib.sha256("\x1f".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class LabelBook:
    """The dataset as a lookup table from normalized utterance to intent."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.labels = sorted(set(answers.values()) | {OUT_OF_SCOPE})

    @classmethod
    def load(cls, path: Path) -> LabelBook:
        splits = json.loads(Path(path).read_text())
        answers: dict[str, str] = {}
        for split in splits.values():
            for utterance, intent in split:
                answers.setdefault(normalize_answer(utterance), intent)
        logger.info("replay teacher dataset loaded", extra={"dataset": str(path), "utterances": len(answers)})
        return cls(answers)

    def true_label(self, utterance: str) -> str:
        return self.answers.get(normalize_answer(utterance), OUT_OF_SCOPE)

    def answer(self, utterance: str, accuracy: float, seed: int, candidates: list[str] | None = None) -> str:
        """The true label, or with probability ``1 - accuracy`` a wrong one, fixed per (seed, utterance).
        A wrong one is drawn from ``candidates`` (default: every label), e.g. the offered tools."""
        truth = self.true_label(utterance)
        key = normalize_answer(utterance)
        others = [label for label in (candidates or self.labels) if label != truth]
        if _unit_hash(seed, "wrong?", key) < accuracy or not others:
            return truth
        return others[int(_unit_hash(seed, "which", key) * len(others))]


# -- token accounting and logprobs (deterministic approximations) ------------------------------
_WORDS = re.compile(r"\w+|[^\w\s]")


def count_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Words and punctuation marks of every message, plus OpenAI's per-message overhead."""
    pieces = sum(len(_WORDS.findall(content_text(message.get("content")))) for message in messages)
    return pieces + 4 * len(messages) + 3


def answer_tokens(answer: str) -> list[str]:
    """The answer split into token-like pieces: ``book_flight`` -> ``book``, ``_flight``."""
    return re.findall(r"_?[^_]+|_", answer) or [answer]


def _token_logprob(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def token_logprobs(tokens: list[str], labels: list[str], top_k: int, seed: int) -> list[dict[str, Any]]:
    """Plausible logprobs: the first piece carries the uncertainty; alternatives are other labels."""
    confidence = 0.55 + 0.44 * _unit_hash(seed, "confidence", "".join(tokens))
    alternatives = [answer_tokens(label)[0] for label in labels]
    content = []
    for index, token in enumerate(tokens):
        chosen = math.log(confidence) if index == 0 else -0.01
        top = [_token_logprob(token, chosen)]
        if top_k > 1:
            rest = 1.0 - math.exp(chosen)
            others = [alt for alt in dict.fromkeys(alternatives) if alt != token]
            start = int(_unit_hash(seed, "alternatives", token, index) * max(len(others), 1))
            for rank in range(min(top_k - 1, len(others))):
                share = rest / 2 ** (rank + 1)  # halves each rank so the mass stays below 1
                top.append(_token_logprob(others[(start + rank) % len(others)], math.log(share)))
        content.append({**top[0], "top_logprobs": top[:top_k]})
    return content


# -- the HTTP surface --------------------------------------------------------------------------
def _error(status: int, message: str, error_type: str, code: str | None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class ReplayTeacher:
    """The behaviour behind the routes: latency, injected errors, answers, usage."""

    def __init__(self, options: ReplayOptions, book: LabelBook) -> None:
        self.options = options
        self.book = book
        # Errors and latency are per call, not per utterance: a retry may succeed. Seeded so a
        # run's sequence of injected failures reproduces.
        self._random = random.Random(options.seed)

    def delay_s(self) -> float:
        mean, jitter = self.options.latency_ms, self.options.latency_jitter_ms
        if mean <= 0:
            return 0.0
        if jitter <= 0:
            return mean / 1000
        sigma2 = math.log(1 + (jitter / mean) ** 2)
        return self._random.lognormvariate(math.log(mean) - sigma2 / 2, math.sqrt(sigma2)) / 1000

    def injected_error(self) -> JSONResponse | None:
        if self._random.random() >= self.options.error_rate:
            return None
        status = self.options.error_status or (500 if self._random.random() < 0.5 else 429)
        if status == 500:
            logger.info("replay teacher (stand-in) injected a 500")
            return _error(500, "The replay teacher (a stand-in) injected a server error.", "server_error", None)
        retry_after = self.options.retry_after_s
        headers = {"retry-after": str(math.ceil(retry_after)), "retry-after-ms": str(int(retry_after * 1000))}
        logger.info("replay teacher (stand-in) injected a 429")
        return _error(429, "The replay teacher (a stand-in) injected a rate limit.", "rate_limit_error",
                      "rate_limit_exceeded", headers)

    def complete(self, request: ChatRequest) -> dict[str, Any]:
        """Everything a response needs, shared by the streamed and the plain shapes."""
        utterance = user_text(request.messages)
        call, answer = decide_call(self.book, utterance, request.tools, request.tool_choice,
                                   self.options.accuracy, self.options.seed)
        tool_calls = None
        if call is not None:
            tool_calls = tool_calls_answer(call, offered_functions(request.tools).get(call, {}), utterance,
                                           f"call_{uuid.uuid4().hex[:24]}")
            answer = tool_calls[0]["function"]["name"] + tool_calls[0]["function"]["arguments"]
        tokens = answer_tokens(answer)
        limit = request.max_completion_tokens or request.max_tokens
        finish_reason = "stop"
        if limit is not None and limit < len(tokens):
            tokens, finish_reason = tokens[:limit], "length"
        logprobs = None
        if request.logprobs and tool_calls is None:
            logprobs = token_logprobs(tokens, self.book.labels, request.top_logprobs or 0, self.options.seed)
        prompt_tokens = count_prompt_tokens(request.messages)
        return {
            "id": f"chatcmpl-replay-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()),
            "model": request.model or self.options.model_name,
            "tokens": tokens,
            "finish_reason": "tool_calls" if tool_calls is not None else finish_reason,
            "tool_calls": tool_calls,
            "logprobs": logprobs,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                      "total_tokens": prompt_tokens + len(tokens)},
        }


def _message(result: dict[str, Any]) -> dict[str, Any]:
    if result.get("tool_calls"):
        return {"role": "assistant", "content": None, "refusal": None, "tool_calls": result["tool_calls"]}
    return {"role": "assistant", "content": "".join(result["tokens"]), "refusal": None}


def completion_body(result: dict[str, Any]) -> dict[str, Any]:
    choice = {
        "index": 0,
        "message": _message(result),
        "logprobs": {"content": result["logprobs"], "refusal": None} if result["logprobs"] is not None else None,
        "finish_reason": result["finish_reason"],
    }
    return {"id": result["id"], "object": "chat.completion", "created": result["created"],
            "model": result["model"], "choices": [choice], "usage": result["usage"],
            "system_fingerprint": "replay-teacher"}


def _chunk(result: dict[str, Any], choices: list[dict[str, Any]], usage: dict[str, Any] | None,
           include_usage: bool) -> str:
    body = {"id": result["id"], "object": "chat.completion.chunk", "created": result["created"],
            "model": result["model"], "choices": choices, "system_fingerprint": "replay-teacher"}
    if include_usage:  # as OpenAI does: ``usage`` is null on every chunk but the last
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


async def stream_events(result: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's event sequence: role, one chunk per token, finish, optional usage, [DONE]."""
    def choice(delta: dict[str, Any], logprobs: Any = None, finish_reason: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]

    yield _chunk(result, choice({"role": "assistant", "content": ""}), None, include_usage)
    for index, call in enumerate(result.get("tool_calls") or []):  # OpenAI: name first, then arguments
        function = call["function"]
        yield _chunk(result, choice({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                                     "function": {"name": function["name"], "arguments": ""}}]}),
                     None, include_usage)
        yield _chunk(result, choice({"tool_calls": [{"index": index, "function": {"arguments": function["arguments"]}}]}),
                     None, include_usage)
    for index, token in enumerate([] if result.get("tool_calls") else result["tokens"]):
        logprobs = {"content": [result["logprobs"][index]], "refusal": None} if result["logprobs"] else None
        yield _chunk(result, choice({"content": token}, logprobs), None, include_usage)
    yield _chunk(result, choice({}, finish_reason=result["finish_reason"]), None, include_usage)
    if include_usage:
        yield _chunk(result, [], result["usage"], include_usage)
    yield "data: [DONE]\n\n"


def create_replay_app(options: ReplayOptions) -> FastAPI:
    """The replay teacher's FastAPI app (a stand-in for a frontier API); loads the dataset now."""
    teacher = ReplayTeacher(options, LabelBook.load(options.dataset))
    app = FastAPI(title="distillgate replay teacher (stand-in for a frontier API)")
    app.state.teacher = teacher

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "role": "replay teacher (stand-in)", "utterances": len(teacher.book.answers)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        model = {"id": options.model_name, "object": "model", "created": 0, "owned_by": OWNED_BY}
        return {"object": "list", "data": [model]}

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request) -> Any:
        try:
            request = ChatRequest.model_validate(await raw.json())
        except (ValidationError, ValueError) as error:
            return _error(400, f"invalid request: {error}"[:500], "invalid_request_error", None)
        delay = teacher.delay_s()
        if delay:
            await asyncio.sleep(delay)
        failure = teacher.injected_error()
        if failure is not None:
            return failure
        result = teacher.complete(request)
        if not request.stream:
            return completion_body(result)
        include_usage = bool((request.stream_options or {}).get("include_usage"))
        return StreamingResponse(stream_events(result, include_usage), media_type="text/event-stream")

    from harness.replay_passthrough import add_passthrough_routes

    add_passthrough_routes(app, teacher)  # legacy completions and embeddings
    return app


def serve_replay_teacher(options: ReplayOptions, host: str = "127.0.0.1", port: int = 8200) -> None:
    """Run the replay teacher (a stand-in for a frontier API) under uvicorn until interrupted."""
    import uvicorn

    logger.info("starting the replay teacher, a stand-in for a frontier API",
                extra={"host": host, "port": port, "dataset": str(options.dataset)})
    uvicorn.run(create_replay_app(options), host=host, port=port, log_level="warning")


# -- the ``distillgate replay-teacher`` command ------------------------------------------------
