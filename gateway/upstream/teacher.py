"""The teacher client for any provider: ``litellm.acompletion``, one call per try.

Retries, fallback, retry-after and concurrency slots are the base's
(gateway/upstream/teacher_base.py); each try is one litellm call with ``num_retries=0``.
Routes whose teacher speaks OpenAI's wire format take the lighter httpx client instead
(gateway/upstream/openai_teacher.py; ``teacher.client``).

Cost comes from the route's prices when set, else litellm's own cost map
(the copy it ships: ``LITELLM_LOCAL_MODEL_COST_MAP=True``, since nothing may be downloaded).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import httpx
import openai

from core.config import TeacherConfig
from core.config_base import Prices
from core.upstream import UpstreamFailure
from gateway.upstream.teacher_base import RETRYABLE_STATUS, TeacherBase, retry_after_s

logger = logging.getLogger(__name__)

# OpenAI parameters litellm takes by name; anything else a client sends goes in extra_body.
NAMED_PARAMS = {
    "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "logprobs",
    "top_logprobs", "response_format", "tools", "tool_choice", "user", "n", "presence_penalty",
    "frequency_penalty", "logit_bias", "parallel_tool_calls", "stream_options", "reasoning_effort",
}
# What a provider call can raise; anything else is our bug and must surface, not become a 502.
UPSTREAM_ERRORS = (openai.APIError, httpx.HTTPError, TimeoutError)


def import_litellm() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    return litellm


def litellm_prices(model: str) -> Prices | None:
    """``model``'s prices per million tokens in litellm's cost map; None when it has none."""
    try:
        input_cost, output_cost = import_litellm().cost_per_token(
            model=model, prompt_tokens=1_000_000, completion_tokens=1_000_000)
    except Exception:  # noqa: BLE001 - litellm raises a bare Exception for a model missing from its map
        logger.warning("no price known for teacher model", extra={"model": model})
        return None
    return Prices(input_per_mtok=float(input_cost), output_per_mtok=float(output_cost))


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


class LiteLLMTeacher(TeacherBase):
    def __init__(self, config: TeacherConfig) -> None:
        super().__init__(config)
        self._litellm = import_litellm()

    def _call_kwargs(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        kwargs = {**self.config.params, **split_params(body), **self._endpoint_kwargs(model)}
        kwargs["messages"] = body["messages"]
        return kwargs

    def _endpoint_kwargs(self, model: str) -> dict[str, Any]:
        """Model, endpoint, key and timeout for one litellm call to ``model``; one try never
        outlives the request's deadline."""
        kwargs: dict[str, Any] = {"model": model, "timeout": self._try_timeout_s(), "num_retries": 0}
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

    async def _retrying(self, call: Callable[[str], Awaitable[Any]],
                        models: list[str] | None = None) -> tuple[Any, str]:
        """The base's retry loop, litellm's errors classified as UpstreamFailure."""
        async def classified(model: str) -> Any:
            try:
                return await call(model)
            except UPSTREAM_ERRORS as error:  # litellm's tree subclasses openai's APIError
                raise _failure_from(error, model) from error

        return await super()._retrying(classified, models)

    async def _complete(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self._litellm.acompletion(**self._call_kwargs(model, body), stream=False)
        return dict(response.model_dump())

    async def _open_stream(self, model: str, body: dict[str, Any]) -> Any:
        return await self._litellm.acompletion(**self._call_kwargs(model, body), stream=True)

    async def _chunks(self, opened: Any, model: str) -> AsyncIterator[dict[str, Any]]:
        try:
            async for chunk in opened:
                yield chunk.model_dump()
        except UPSTREAM_ERRORS as error:  # a stream cut mid-way: classify like any teacher failure
            raise _failure_from(error, model) from error

    def _prices_cost(self, prompt_tokens: int, completion_tokens: int, model: str) -> float:
        """litellm's cost map, for a route without prices."""
        try:
            prompt_cost, completion_cost = self._litellm.cost_per_token(
                model=model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        except Exception:  # noqa: BLE001 - litellm raises a bare Exception for a model missing from its map
            logger.warning("no price known for teacher model", extra={"model": model})
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
