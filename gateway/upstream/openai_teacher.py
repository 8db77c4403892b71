"""The teacher client for OpenAI-compatible teachers: plain httpx on one pooled client.

``litellm.acompletion`` added 10.9 ms at p50 to every teacher call (issue 12); a teacher that
already speaks OpenAI's wire format needs no translation, so its calls are a bare POST of
the client's body to ``{api_base}/chat/completions`` (the OpenAI API itself when no
api_base is set), with the model's name less litellm's ``openai/`` prefix. Retries,
fallback, retry-after and slots are the base's (gateway/upstream/teacher_base.py).

Failures: a 429, 408, 409 or 5xx answer, a timeout, a connection error, a malformed body and
a stream cut before its end are retryable (a stream only before its first chunk); any
other 4xx is the request's and is not. Cost: the route's prices, else litellm's cost map
read once here, never per call.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx

from core.config import Prices, TeacherConfig
from core.route_config import OPENAI_PREFIX
from core.upstream import UpstreamFailure
from gateway.upstream.openai_wire import parse_completion, parse_sse_line
from gateway.upstream.teacher_base import RETRYABLE_STATUS, TeacherBase, retry_after_s

logger = logging.getLogger(__name__)

OPENAI_API_BASE = "https://api.openai.com/v1"
# Beyond the teacher's slots: room for health checks, so that they never wait on a call.
SPARE_CONNECTIONS = 4


class OpenAITeacher(TeacherBase):
    def __init__(self, config: TeacherConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(config)
        # (url, headers) per model: keys come from the environment once, at start.
        self._endpoints = {model: _endpoint(config, model) for model in config.models()}
        connections = config.max_concurrency + SPARE_CONNECTIONS
        self._client = httpx.AsyncClient(
            transport=transport,
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            timeout=httpx.Timeout(config.timeout_s),
        )
        self._map_prices: dict[str, Prices | None] = {}
        if config.prices is None:
            from gateway.upstream.teacher import litellm_prices

            self._map_prices = {model: litellm_prices(model) for model in config.models()}

    @property
    def http_client(self) -> httpx.AsyncClient:
        """The pooled client (tracing instruments it)."""
        return self._client

    def _request(self, model: str, body: dict[str, Any], stream: bool) -> httpx.Request:
        url, headers = self._endpoints[model]
        payload = {**self.config.params, **body, "model": model.removeprefix(OPENAI_PREFIX), "stream": stream}
        return self._client.build_request("POST", url, json=payload, headers=headers,
                                          timeout=httpx.Timeout(self._try_timeout_s()))

    async def _send(self, model: str, request: httpx.Request, stream: bool) -> httpx.Response:
        """The response once its status is 200 (a stream's body still unread)."""
        try:
            response = await self._client.send(request, stream=stream)
        except httpx.HTTPError as error:
            raise _transport_failure(error, model) from error
        if response.status_code != 200:
            try:
                await response.aread()
            except httpx.HTTPError as error:
                raise _transport_failure(error, model) from error
            finally:
                await response.aclose()
            raise _status_failure(response, model)
        return response

    async def _complete(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self._send(model, self._request(model, body, stream=False), stream=False)
        return parse_completion(response, f"teacher {model}")

    async def _open_stream(self, model: str, body: dict[str, Any]) -> httpx.Response:
        return await self._send(model, self._request(model, body, stream=True), stream=True)

    async def _chunks(self, opened: httpx.Response, model: str) -> AsyncIterator[dict[str, Any]]:
        """Chunks up to ``[DONE]``. A stream that ends with neither ``[DONE]`` nor a
        finish_reason was cut: a failure, not a short answer."""
        who, finished = f"teacher {model}", False
        try:
            async for line in opened.aiter_lines():
                if line.startswith("data:") and line[5:].strip() == "[DONE]":
                    return
                chunk = parse_sse_line(line, who)
                if chunk is not None:
                    finished = finished or any(choice.get("finish_reason") for choice in chunk.get("choices") or ())
                    yield chunk
        except httpx.HTTPError as error:
            raise _transport_failure(error, model) from error
        finally:
            await opened.aclose()
        if not finished:
            raise UpstreamFailure(f"{who} stream ended mid-answer", retryable=True)

    def _prices_cost(self, prompt_tokens: int, completion_tokens: int, model: str) -> float:
        prices = self._map_prices.get(model)
        return prices.cost(prompt_tokens, completion_tokens) if prices is not None else 0.0

    async def healthy(self) -> bool:
        """Reachability only where a base URL is known (OpenAI's API is assumed up)."""
        if not self.config.api_base:
            return True
        url, headers = self._endpoints[self.config.model]
        try:
            response = await self._client.get(url.removesuffix("/chat/completions") + "/models", headers=headers,
                                              timeout=2.0)
        except httpx.HTTPError:
            return False
        return response.status_code < 500

    async def aclose(self) -> None:
        await self._client.aclose()


def _endpoint(config: TeacherConfig, model: str) -> tuple[str, dict[str, str]]:
    """``model``'s chat completions URL and headers. With no api_base it is OpenAI's API, and
    the key defaults to ``OPENAI_API_KEY`` (as litellm's would)."""
    api_base, api_key = config.endpoint(model)
    if not api_base:
        api_base, api_key = OPENAI_API_BASE, api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    return api_base.rstrip("/") + "/chat/completions", headers


def _transport_failure(error: httpx.HTTPError, model: str) -> UpstreamFailure:
    if isinstance(error, httpx.PoolTimeout):  # the gateway's own pool is full: not the teacher's fault
        return UpstreamFailure(f"teacher {model}: connection pool exhausted", timeout=True, retryable=True,
                               server_fault=False)
    if isinstance(error, httpx.TimeoutException):
        return UpstreamFailure(f"teacher {model} timed out: {error!r}", timeout=True, retryable=True)
    return UpstreamFailure(f"teacher {model} unreachable: {error!r}", retryable=True)


def _status_failure(response: httpx.Response, model: str) -> UpstreamFailure:
    """A non-200 answer: retryable for 429/408/409/5xx, the provider's retry-after kept."""
    message = response.text[:300]
    with contextlib.suppress(ValueError, KeyError, TypeError):
        message = str(response.json()["error"]["message"])[:300]
    status = response.status_code
    return UpstreamFailure(f"teacher {model} answered {status}: {message}", status_code=status,
                           retryable=status in RETRYABLE_STATUS, retry_after_s=retry_after_s(response.headers))
