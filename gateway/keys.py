"""Per-key policies for client keys: a route allow-list and a rate limit.

Configured under ``auth.keys`` (each entry names the environment variable holding the key);
keys from ``auth.client_keys_env`` have no policy: every route, no limit.

The rate limit is a token bucket per key: ``burst`` requests at once (default: a minute's
worth), refilled at ``requests_per_minute / 60`` a second. A request finding the bucket
empty gets 429 with ``retry-after`` (whole seconds, as OpenAI sends it) and
``retry-after-ms``. Buckets live in this process: with several gateway replicas each
enforces its own share. Keys appear only as ``key_id`` hashes, never in logs.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

from core.config import AuthConfig, ClientKeyConfig
from gateway.auth import key_id
from gateway.errors import RateLimited, RouteNotFound

logger = logging.getLogger(__name__)


def resolved_keys(config: AuthConfig) -> list[tuple[str, ClientKeyConfig]]:
    """(key id, policy) for each key in ``auth.keys`` whose variable is set; the key itself
    goes no further than this function."""
    resolved = []
    for entry in config.keys:
        key = os.environ.get(entry.key_env, "").strip()
        if key:
            resolved.append((key_id(key), entry))
    return resolved


def key_names(config: AuthConfig) -> dict[str, str]:
    """Key id -> the name an operator knows it by (its ``key_env``), for reports."""
    return {client_key_id: entry.key_env for client_key_id, entry in resolved_keys(config)}


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


@dataclass
class KeyPolicy:
    name: str
    routes: frozenset[str] | None
    bucket: TokenBucket | None
    trusted_for_training: bool = False


class KeyPolicies:
    """The policies of the keys in ``auth.keys``, looked up by key id."""

    def __init__(self, config: AuthConfig) -> None:
        self.keys: list[str] = []
        self._by_id: dict[str, KeyPolicy] = {}
        self._anonymous_trusted = config.anonymous_trusted_for_training
        self._env_keys_trusted = config.client_keys_trusted_for_training
        for entry in config.keys:
            key = os.environ.get(entry.key_env, "").strip()
            if not key:
                logger.warning("client key not set; that key cannot be used", extra={"key_env": entry.key_env})
                continue
            rate = entry.requests_per_minute
            bucket = TokenBucket(entry.burst or max(1.0, rate), rate / 60) if rate else None
            self.keys.append(key)
            self._by_id[key_id(key)] = KeyPolicy(entry.key_env, frozenset(entry.routes) if entry.routes else None,
                                                 bucket, entry.trusted_for_training)

    def admit(self, client_key_id: str | None) -> None:
        """Raises RateLimited when the key's bucket is empty."""
        policy = self._by_id.get(client_key_id or "")
        if policy is None or policy.bucket is None:
            return
        wait_s = policy.bucket.take()
        if wait_s > 0:
            logger.info("client key rate limited", extra={"key_id": client_key_id, "retry_after_s": wait_s})
            raise RateLimited("Rate limit reached for this API key: too many requests per minute.",
                              headers={"retry-after": str(math.ceil(wait_s)),
                                       "retry-after-ms": str(math.ceil(wait_s * 1000))})

    def trusted_for_training(self, client_key_id: str | None) -> bool:
        """Whether this caller's rows may become training data (see ``auth`` in the config)."""
        if client_key_id is None:
            return self._anonymous_trusted
        policy = self._by_id.get(client_key_id)
        return policy.trusted_for_training if policy is not None else self._env_keys_trusted

    def route_allowed(self, client_key_id: str | None, route: str) -> bool:
        policy = self._by_id.get(client_key_id or "")
        return policy is None or policy.routes is None or route in policy.routes

    def check_route(self, client_key_id: str | None, route: str) -> None:
        """Raises 404 as OpenAI does for a model the key may not use: its existence is not told."""
        if not self.route_allowed(client_key_id, route):
            raise RouteNotFound(f"The model '{route}' does not exist or you do not have access to it.",
                                param="model")
