"""What every teacher client shares, whatever carries its calls (litellm or plain httpx).

Retries 429/5xx/timeouts with exponential backoff and jitter, then tries the configured
fallback model. A provider's ``retry-after`` (or ``retry-after-ms``) is honoured: the next
try waits at least that long, and when that wait is longer than ``max_retry_after_s`` or
than what is left of the request's deadline, no retry is made and the 429 goes on to the
client with its ``retry-after`` (as LiteLLM's router and Envoy's rate-limited back-off do).
At most ``max_concurrency`` calls run at once (a stream holds its slot until it ends); a call
waits ``queue_timeout_s`` for a slot at most, then fails as a 503 with ``retry-after``.

The retry loop is ours rather than ``litellm.Router``'s: it must see the request's deadline
(gateway/deadline.py) and count every try for the tests. A subclass makes one try:
``_complete`` (a ``chat.completion`` dict) and ``_open_stream`` / ``_chunks``, raising
:class:`UpstreamFailure` for what went wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from core.config import TeacherConfig
from core.upstream import Completion, UpstreamFailure
from gateway import deadline

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}


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


def capacity_failure(queue_timeout_s: float) -> UpstreamFailure:
    return UpstreamFailure(f"every teacher slot stayed busy for {queue_timeout_s:g} s", status_code=503,
                           retryable=False, retry_after_s=1.0)


class TeacherBase:
    """Slots, retries, fallback and accounting; a subclass says how one try is made."""

    def __init__(self, config: TeacherConfig) -> None:
        self.config = config
        self.model = config.model
        self._slots = asyncio.Semaphore(config.max_concurrency)

    # -- one try: what a subclass provides ---------------------------------------------------
    async def _complete(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """One non-streamed call to ``model``: the answer in ``chat.completion`` shape."""
        raise NotImplementedError

    async def _open_stream(self, model: str, body: dict[str, Any]) -> Any:
        """One streamed call to ``model``, opened (the provider accepted it)."""
        raise NotImplementedError

    def _chunks(self, opened: Any, model: str) -> AsyncIterator[dict[str, Any]]:
        """The chunks of an opened stream as dicts; a cut raises UpstreamFailure."""
        raise NotImplementedError

    def _prices_cost(self, prompt_tokens: int, completion_tokens: int, model: str) -> float:
        """Cost when the route sets no prices."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------
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

    def _try_timeout_s(self) -> float:
        """One try's timeout: the route's, never outliving the request's deadline."""
        timeout_s = self.config.timeout_s
        left = deadline.remaining_s()
        if left is not None:
            timeout_s = max(0.001, min(timeout_s, left))
        return timeout_s

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
            except UpstreamFailure as failure:
                logger.warning("teacher call failed", extra={
                    "model": model, "attempt": attempt, "status": failure.status_code,
                    "retryable": failure.retryable, "retry_after_s": failure.retry_after_s})
                if not failure.retryable or attempt == self.config.max_retries:
                    raise
                wait = self._retry_wait(attempt, failure)
                if wait is None:
                    raise
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

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
            data, model = await self._retrying(lambda model: self._complete(model, body))
        finally:
            self._slots.release()
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
            opened, model = await self._retrying(lambda model: self._open_stream(model, body))
            async with contextlib.aclosing(self._chunks(opened, model)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self._slots.release()

    async def aclose(self) -> None:
        """Release what the client holds (a pooled client's connections); nothing by default."""

    def cost(self, prompt_tokens: int, completion_tokens: int, model: str | None = None) -> float:
        if self.config.prices is not None:
            return self.config.prices.cost(prompt_tokens, completion_tokens)
        return self._prices_cost(prompt_tokens, completion_tokens, model or self.config.model)
