"""The teacher client: any provider through ``litellm.acompletion``.

Retries 429/5xx/timeouts with exponential backoff and jitter, then tries the configured
fallback model. Cost comes from the route's prices when set, else litellm's own cost map
(the copy it ships: ``LITELLM_LOCAL_MODEL_COST_MAP=True``, since nothing may be downloaded).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import openai

from core.config import TeacherConfig
from core.upstream import Completion, UpstreamFailure

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


def _failure_from(error: Exception, model: str) -> UpstreamFailure:
    status = getattr(error, "status_code", None)
    timeout = "timeout" in type(error).__name__.lower()
    connection = "connection" in type(error).__name__.lower()
    retryable = timeout or connection or (isinstance(status, int) and status in RETRYABLE_STATUS)
    message = str(getattr(error, "message", error))[:500]
    return UpstreamFailure(f"teacher {model} failed: {message}", status_code=status if isinstance(status, int) else None,
                           timeout=timeout, retryable=retryable)


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

    def _call_kwargs(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        kwargs = {**self.config.params, **split_params(body), **self._endpoint_kwargs(model)}
        kwargs["messages"] = body["messages"]
        return kwargs

    def _endpoint_kwargs(self, model: str) -> dict[str, Any]:
        """Model, endpoint, key and timeout for one litellm call to ``model``."""
        kwargs: dict[str, Any] = {"model": model, "timeout": self.config.timeout_s, "num_retries": 0}
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

    async def _backoff(self, attempt: int) -> None:
        delay = self.config.backoff_base_s * (2**attempt)
        await asyncio.sleep(delay * (0.5 + random.random()))

    async def _with_retries(self, body: dict[str, Any], stream: bool) -> tuple[Any, str]:
        return await self._retrying(
            lambda model: self._litellm.acompletion(**self._call_kwargs(model, body), stream=stream))

    async def _retrying(self, call: Callable[[str], Awaitable[Any]],
                        models: list[str] | None = None) -> tuple[Any, str]:
        """``call(model)`` with retries and backoff, then the fallback model; (result, model)."""
        last: UpstreamFailure | None = None
        for model in models or self._models():
            for attempt in range(self.config.max_retries + 1):
                try:
                    return await call(model), model
                except UPSTREAM_ERRORS as error:  # litellm's tree subclasses openai's APIError
                    last = _failure_from(error, model)
                    logger.warning("teacher call failed", extra={"model": model, "attempt": attempt,
                                                                 "status": last.status_code, "retryable": last.retryable})
                    if not last.retryable:
                        raise last from error
                    if attempt < self.config.max_retries:
                        await self._backoff(attempt)
        assert last is not None
        raise last

    async def chat(self, body: dict[str, Any]) -> Completion:
        started = time.perf_counter()
        response, model = await self._with_retries(body, stream=False)
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
        response, model = await self._with_retries(body, stream=True)
        try:
            async for chunk in response:
                yield chunk.model_dump()
        except UPSTREAM_ERRORS as error:  # a stream cut mid-way: classify like any teacher failure
            raise _failure_from(error, model) from error

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
