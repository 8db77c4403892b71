"""Per-key rate limits: where each key's budget lives (``rate_limit`` in the config).

* In this process (default): a token bucket per key, ``burst`` requests at once (default: a
  minute's worth), refilled at ``requests_per_minute / 60`` a second. Each ``serve``
  replica enforces the whole limit on its own.
* Shared (``rate_limit.storage`` names a Redis URL): the ``limits`` library's moving window
  in Redis, ``burst`` requests per ``burst / requests_per_minute`` minutes, one budget for
  every replica. Same sustained rate and burst as the bucket; after a burst, capacity comes
  back as the oldest requests leave the window (the ``retry-after`` says when), where the
  bucket gives one back every ``60 / requests_per_minute`` seconds. ``limits`` has no token
  bucket, and its moving window is one atomic script per request in Redis.

A request over the limit gets 429 with ``retry-after`` (whole seconds, as OpenAI sends it)
and ``retry-after-ms``. When Redis cannot be reached, ``rate_limit.on_storage_error`` says
what happens: ``allow`` (fail open: the request is served unlimited) or ``refuse`` (fail
closed: 503). Either way it is logged and counted; for ``ERROR_BACKOFF_S`` after a failure
Redis is not asked again, so a dead Redis costs a limited request no connect attempt.
Keys reach Redis (and the logs) only as ``key_id`` hashes.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from core.config import RateLimitConfig
from gateway.errors import RateLimited, Unavailable

logger = logging.getLogger(__name__)

ERROR_BACKOFF_S = 1.0
NAMESPACE = "distillgate-ratelimit"


@dataclass(frozen=True)
class Rate:
    """A key's limit: ``per_minute`` sustained, ``burst`` at once."""

    per_minute: float
    burst: float

    @classmethod
    def of(cls, per_minute: float, burst: int | None) -> Rate:
        return cls(per_minute, burst or max(1.0, per_minute))

    def window(self) -> tuple[int, int]:
        """(requests, seconds): the moving window holding ``burst`` requests at this rate, in
        the whole numbers ``limits`` counts in (the window rounded up: never looser)."""
        requests = max(1, math.floor(self.burst))
        return requests, max(1, math.ceil(requests * 60 / self.per_minute))


@dataclass
class TokenBucket:
    capacity: float
    refill_per_s: float
    tokens: float = field(init=False)
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = self.capacity

    def take(self, now: float | None = None) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is available."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.refill_per_s)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.refill_per_s


class RateLimiter(Protocol):
    storage: str
    # Outcomes decided without the storage: "allowed" or "refused" -> count (for /metrics).
    unchecked: Counter[str]
    storage_errors: int

    async def wait_s(self, key: str, rate: Rate) -> float:
        """0.0 when the request may go ahead, else the seconds until it may."""
        ...

    async def aclose(self) -> None: ...


class LocalLimiter:
    """A token bucket per key, in this process."""

    storage = "memory"

    def __init__(self) -> None:
        self._buckets: dict[str, TokenBucket] = {}
        self.unchecked: Counter[str] = Counter()
        self.storage_errors = 0

    async def wait_s(self, key: str, rate: Rate) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(rate.burst, rate.per_minute / 60)
        return bucket.take()

    async def aclose(self) -> None:
        return None


class SharedLimiter:
    """A moving window per key in Redis, through ``limits`` (shared by every replica)."""

    storage = "redis"

    def __init__(self, url: str, config: RateLimitConfig) -> None:
        from limits.aio.strategies import MovingWindowRateLimiter
        from limits.storage import storage_from_string

        # redis-py's asyncio client (a dependency already); wrapped errors are StorageError.
        self._storage: Any = storage_from_string(
            f"async+{url}", implementation="redispy", wrap_exceptions=True, key_prefix=NAMESPACE,
            socket_connect_timeout=config.timeout_s, socket_timeout=config.timeout_s)
        self._limiter = MovingWindowRateLimiter(self._storage)
        self.on_storage_error = config.on_storage_error
        self.unchecked: Counter[str] = Counter()
        self.storage_errors = 0
        self._skip_until = 0.0

    async def wait_s(self, key: str, rate: Rate) -> float:
        from limits import RateLimitItemPerSecond
        from limits.errors import StorageError

        if time.monotonic() < self._skip_until:
            return self._unchecked(key)
        item = RateLimitItemPerSecond(*rate.window())
        try:
            if await self._limiter.hit(item, key):
                return 0.0
            stats = await self._limiter.get_window_stats(item, key)
        except StorageError as error:
            self.storage_errors += 1
            self._skip_until = time.monotonic() + ERROR_BACKOFF_S
            logger.error("rate-limit storage unreachable", extra={
                "error": str(error)[:200], "on_storage_error": self.on_storage_error})
            return self._unchecked(key)
        return max(0.001, stats.reset_time - time.time())

    def _unchecked(self, key: str) -> float:
        """The decision when Redis cannot be asked: allow, or raise the 503."""
        if self.on_storage_error == "allow":
            self.unchecked["allowed"] += 1
            return 0.0
        self.unchecked["refused"] += 1
        logger.warning("request refused: rate-limit storage unreachable", extra={"key_id": key})
        raise Unavailable("The rate-limit service is unavailable; try again shortly.",
                          headers={"retry-after": str(math.ceil(ERROR_BACKOFF_S))})

    async def aclose(self) -> None:
        bridge = getattr(self._storage, "bridge", None)
        client = getattr(bridge, "storage", None)
        if client is not None:
            await client.aclose()


def build_rate_limiter(config: RateLimitConfig) -> RateLimiter:
    url = config.storage_url()
    return SharedLimiter(url, config) if url else LocalLimiter()


async def enforce(limiter: RateLimiter, key: str, rate: Rate) -> None:
    """Raises RateLimited (429) when the key is over its rate."""
    wait_s = await limiter.wait_s(key, rate)
    if wait_s > 0:
        logger.info("client key rate limited", extra={"key_id": key, "retry_after_s": round(wait_s, 3),
                                                      "storage": limiter.storage})
        raise RateLimited("Rate limit reached for this API key: too many requests per minute.",
                          headers={"retry-after": str(math.ceil(wait_s)),
                                   "retry-after-ms": str(math.ceil(wait_s * 1000))})
