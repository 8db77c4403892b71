"""The teacher client: any provider through ``litellm.acompletion``.

Retries 429/5xx/timeouts with exponential backoff and jitter, then tries the configured
fallback model. A provider's ``retry-after`` (or ``retry-after-ms``) is honoured: the next
try waits at least that long, and when that wait is longer than ``max_retry_after_s`` or
than what is left of the request's deadline, no retry is made and the 429 goes on to the
client with its ``retry-after`` (as LiteLLM's router and Envoy's rate-limited back-off do).
At most ``max_concurrency`` calls run at once (a stream holds its slot until it ends); a call
waits ``queue_timeout_s`` for a slot at most, then fails as a 503 with ``retry-after``.

The retry loop is ours rather than ``litellm.Router``'s: it must see the request's deadline
(gateway/deadline.py) and count every try for the tests; each try is one litellm call with
``num_retries=0``.

Cost comes from the route's prices when set, else litellm's own cost map
(the copy it ships: ``LITELLM_LOCAL_MODEL_COST_MAP=True``, since nothing may be downloaded).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import httpx
import openai

from core.config import TeacherConfig
from core.upstream import Completion, UpstreamFailure
from gateway import deadline

logger = logging.getLogger(__name__)

# OpenAI parameters litellm takes by name; anything else a client sends goes in extra_body.
NAMED_PARAMS = {
    "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "logprobs",
    "top_logprobs", "response_format", "tools", "tool_choice", "user", "n", "presence_penalty",
    "frequency_penalty", "logit_bias", "parallel_tool_calls", "stream_options", "reasoning_effort",
}
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
# What a provider call can raise; anything else is our bug and must surface, not become a 502.
UPSTREAM_ERRORS = (openai.APIError, httpx.HTTPError, TimeoutError)


def import_litellm() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    return litellm


def retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    """The wait a provider asked for: ``retry-after-ms``, else ``retry-after`` (seconds or an
    HTTP date); None when absent or unreadable."""
    if not headers:
        return None
    lowered = {str(key).lower(): str(value) for key, value in headers.items()}
    try:
        if "retry-after-ms" in lowered:
            return max(0.0, float(lowered["retry-after-ms"]) / 1000)
        if "retry-after" in lowered:
            value = lowered["retry-after"].strip()
            if value.replace(".", "", 1).isdigit():
                return float(value)
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (ValueError, TypeError, OverflowError):
        return None
    return None


def _error_headers(error: Exception) -> Mapping[str, str] | None:
    # litellm keeps the provider's response headers here; the raw response is a fallback.
    headers = getattr(error, "litellm_response_headers", None)
    if headers:
        return headers
    response = getattr(error, "response", None)
    return getattr(response, "headers", None)


def _failure_from(error: Exception, model: str) -> UpstreamFailure:
    status = getattr(error, "status_code", None)
    timeout = "timeout" in type(error).__name__.lower()
    connection = "connection" in type(error).__name__.lower()
    retryable = timeout or connection or (isinstance(status, int) and status in RETRYABLE_STATUS)
    message = str(getattr(error, "message", error))[:500]
    return UpstreamFailure(f"teacher {model} failed: {message}", status_code=status if isinstance(status, int) else None,
                           timeout=timeout, retryable=retryable, retry_after_s=retry_after_s(_error_headers(error)))


def capacity_failure(queue_timeout_s: float) -> UpstreamFailure:
    return UpstreamFailure(f"every teacher slot stayed busy for {queue_timeout_s:g} s", status_code=503,
                           retryable=False, retry_after_s=1.0)


def split_params(body: dict[str, Any]) -> dict[str, Any]:
    """The request's parameters as litellm keyword arguments."""
    kwargs: dict[str, Any] = {}
    extra_body: dict[str, Any] = {}
    for key, value in body.items():
        if key in ("model", "messages", "stream"):
            continue
        (kwargs if key in NAMED_PARAMS else extra_body)[key] = value
    if extra_body:
        kwargs["extra_body"] = extra_body
    return kwargs


class LiteLLMTeacher:
    def __init__(self, config: TeacherConfig) -> None:
        self.config = config
        self.model = config.model
        self._litellm = import_litellm()
        self._slots = asyncio.Semaphore(config.max_concurrency)

    async def _acquire(self) -> None:
        """A concurrency slot, waiting at most ``queue_timeout_s`` (and the request's deadline)."""
        wait_s = self.config.queue_timeout_s
        left = deadline.remaining_s()
        if left is not None:
            wait_s = min(wait_s, max(0.0, left))
        try:
            await asyncio.wait_for(self._slots.acquire(), wait_s)
        except TimeoutError:
            logger.warning("teacher at its concurrency limit", extra={"model": self.model,
                                                                      "max_concurrency": self.config.max_concurrency})
            raise capacity_failure(wait_s) from None

    def _call_kwargs(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        kwargs = {**self.config.params, **split_params(body), **self._endpoint_kwargs(model)}
        kwargs["messages"] = body["messages"]
        return kwargs

    def _endpoint_kwargs(self, model: str) -> dict[str, Any]:
        """Model, endpoint, key and timeout for one litellm call to ``model``; one try never
        outlives the request's deadline."""
        timeout_s = self.config.timeout_s
        left = deadline.remaining_s()
        if left is not None:
            timeout_s = max(0.001, min(timeout_s, left))
        kwargs: dict[str, Any] = {"model": model, "timeout": timeout_s, "num_retries": 0}
        api_base, api_key = self.config.endpoint(model)
        if api_base:
            kwargs["api_base"] = api_base
        if api_key:
            kwargs["api_key"] = api_key
        elif api_base:
            # A self-hosted OpenAI-compatible upstream (the replay teacher) needs no key, but
            # the OpenAI client refuses to start without one.
            kwargs["api_key"] = "no-key"
        return kwargs

    def _models(self) -> list[str]:
        return [self.config.model] + ([self.config.fallback_model] if self.config.fallback_model else [])

    def _retry_wait(self, attempt: int, failure: UpstreamFailure) -> float | None:
        """Seconds to wait before the next try, or None when it must not be made: the
        provider's retry-after is longer than we honour or than the request has left."""
        backoff = self.config.backoff_base_s * (2**attempt) * (0.5 + random.random())
        if failure.retry_after_s is not None and failure.retry_after_s > self.config.max_retry_after_s:
            return None
        wait = max(backoff, failure.retry_after_s or 0.0)
        left = deadline.remaining_s()
        return None if left is not None and wait >= left else wait

    async def _try_model(self, call: Callable[[str], Awaitable[Any]], model: str) -> Any:
        """One model's tries; raises its last failure."""
        for attempt in range(self.config.max_retries + 1):
            try:
                return await call(model)
            except UPSTREAM_ERRORS as error:  # litellm's tree subclasses openai's APIError
                failure = _failure_from(error, model)
                logger.warning("teacher call failed", extra={
                    "model": model, "attempt": attempt, "status": failure.status_code,
                    "retryable": failure.retryable, "retry_after_s": failure.retry_after_s})
                if not failure.retryable or attempt == self.config.max_retries:
                    raise failure from error
                wait = self._retry_wait(attempt, failure)
                if wait is None:
                    raise failure from error
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def _with_retries(self, body: dict[str, Any], stream: bool) -> tuple[Any, str]:
        return await self._retrying(
            lambda model: self._litellm.acompletion(**self._call_kwargs(model, body), stream=stream))

    async def _retrying(self, call: Callable[[str], Awaitable[Any]],
                        models: list[str] | None = None) -> tuple[Any, str]:
        """``call(model)`` with retries (backoff, the provider's retry-after, the request's
        deadline), then the fallback model; (result, model)."""
        last: UpstreamFailure | None = None
        for model in models or self._models():
            try:
                return await self._try_model(call, model), model
            except UpstreamFailure as failure:
                if not failure.retryable:
                    raise
                last = failure
        assert last is not None
        raise last

    async def chat(self, body: dict[str, Any]) -> Completion:
        started = time.perf_counter()
        await self._acquire()
        try:
            response, model = await self._with_retries(body, stream=False)
        finally:
            self._slots.release()
        data = response.model_dump()
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
        return Completion(
            body=data,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=self.cost(prompt_tokens, completion_tokens, model),
            latency_ms=(time.perf_counter() - started) * 1000,
            model=model,
        )

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        body = {**body, "stream_options": {"include_usage": True}}
        await self._acquire()
        try:
            response, model = await self._with_retries(body, stream=True)
            try:
                async for chunk in response:
                    yield chunk.model_dump()
            except UPSTREAM_ERRORS as error:  # a stream cut mid-way: classify like any teacher failure
                raise _failure_from(error, model) from error
        finally:
            self._slots.release()

    def cost(self, prompt_tokens: int, completion_tokens: int, model: str | None = None) -> float:
        if self.config.prices is not None:
            return self.config.prices.cost(prompt_tokens, completion_tokens)
        try:
            prompt_cost, completion_cost = self._litellm.cost_per_token(
                model=model or self.config.model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
            )
        except Exception:  # noqa: BLE001 - litellm raises a bare Exception for a model missing from its map
            logger.warning("no price known for teacher model", extra={"model": model or self.config.model})
            return 0.0
        return float(prompt_cost + completion_cost)

    async def healthy(self) -> bool:
        """Reachability only where a base URL is known (a provider's API is assumed up)."""
        if not self.config.api_base:
            return True
        api_key = self.config.api_key()
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            async with httpx.AsyncClient(timeout=2.0) as client:
                response = await client.get(self.config.api_base.rstrip("/") + "/models", headers=headers)
        except httpx.HTTPError:
            return False
        return response.status_code < 500
