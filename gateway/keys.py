"""Per-key policies for client keys: a route allow-list and a rate limit.

Configured under ``auth.keys`` (each entry names the environment variable holding the key);
keys from ``auth.client_keys_env`` have no policy: every route, no limit.

The rate limit (``requests_per_minute``, ``burst``) is kept by gateway/rate_limits.py: in
this process, or in Redis shared by every replica (``rate_limit.storage``). Keys appear only
as ``key_id`` hashes, never in logs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from core.config import AuthConfig, ClientKeyConfig
from gateway.auth import key_id
from gateway.errors import RouteNotFound
from gateway.rate_limits import LocalLimiter, Rate, RateLimiter, enforce

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
class KeyPolicy:
    name: str
    routes: frozenset[str] | None
    rate: Rate | None
    trusted_for_training: bool = False


class KeyPolicies:
    """The policies of the keys in ``auth.keys``, looked up by key id."""

    def __init__(self, config: AuthConfig, limiter: RateLimiter | None = None) -> None:
        self.limiter = limiter or LocalLimiter()
        self.keys: list[str] = []
        self._by_id: dict[str, KeyPolicy] = {}
        self._anonymous_trusted = config.anonymous_trusted_for_training
        self._env_keys_trusted = config.client_keys_trusted_for_training
        for entry in config.keys:
            key = os.environ.get(entry.key_env, "").strip()
            if not key:
                logger.warning("client key not set; that key cannot be used", extra={"key_env": entry.key_env})
                continue
            rate = Rate.of(entry.requests_per_minute, entry.burst) if entry.requests_per_minute else None
            self.keys.append(key)
            self._by_id[key_id(key)] = KeyPolicy(entry.key_env, frozenset(entry.routes) if entry.routes else None,
                                                 rate, entry.trusted_for_training)

    async def admit(self, client_key_id: str | None) -> None:
        """Raises RateLimited (429) when the key is over its rate (503: see rate_limits.py)."""
        policy = self._by_id.get(client_key_id or "")
        if policy is None or policy.rate is None or client_key_id is None:
            return
        await enforce(self.limiter, client_key_id, policy.rate)

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
