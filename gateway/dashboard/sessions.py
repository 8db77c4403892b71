"""Server-side dashboard sessions and the sign-in rate limit.

Signing in (``POST /dashboard/login`` with the admin token) creates a session: a random id
in an HttpOnly, SameSite=Strict cookie, its state here. A session ends when it is idle for
``auth.session_idle_s``, ``auth.session_ttl_s`` after sign-in, at sign-out, or when an admin
revokes every session (``POST /admin/sessions/revoke``). Sessions live in this process: a
restart signs everyone out, and with several replicas each holds its own (as with the keys'
rate limits). Sign-in attempts are limited per client address and in total, so the token
cannot be guessed at speed.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from core.config import AuthConfig
from gateway.rate_limits import TokenBucket

# Beyond this many remembered addresses the oldest bucket is forgotten (bounded memory).
MAX_TRACKED_ADDRESSES = 10_000


@dataclass
class Session:
    actor: str
    created: float
    last_seen: float


class SessionStore:
    def __init__(self, ttl_s: float, idle_s: float) -> None:
        self.ttl_s, self.idle_s = ttl_s, idle_s
        # Keyed by a hash of the cookie value, so a memory dump does not hand out live cookies.
        self._sessions: dict[str, Session] = {}

    @staticmethod
    def _key(session_id: str) -> str:
        return hashlib.sha256(session_id.encode()).hexdigest()

    def create(self, actor: str) -> str:
        self._expire()
        session_id = secrets.token_urlsafe(32)
        now = time.monotonic()
        self._sessions[self._key(session_id)] = Session(actor, now, now)
        return session_id

    def get(self, session_id: str) -> Session | None:
        """The live session for this cookie value (its idle clock restarted), else None."""
        key = self._key(session_id)
        session = self._sessions.get(key)
        now = time.monotonic()
        if session is None:
            return None
        if now - session.created > self.ttl_s or now - session.last_seen > self.idle_s:
            del self._sessions[key]
            return None
        session.last_seen = now
        return session

    def revoke(self, session_id: str) -> bool:
        return self._sessions.pop(self._key(session_id), None) is not None

    def revoke_all(self) -> int:
        count = len(self._sessions)
        self._sessions.clear()
        return count

    def __len__(self) -> int:
        self._expire()
        return len(self._sessions)

    def _expire(self) -> None:
        now = time.monotonic()
        for key, session in list(self._sessions.items()):
            if now - session.created > self.ttl_s or now - session.last_seen > self.idle_s:
                del self._sessions[key]


class SignInLimiter:
    """Token buckets per client address and for all addresses together."""

    def __init__(self, per_minute: float) -> None:
        self.per_minute = per_minute
        self._by_address: dict[str, TokenBucket] = {}
        self._everyone = TokenBucket(capacity=per_minute * 6, refill_per_s=per_minute * 6 / 60)

    def wait_s(self, address: str) -> float:
        """0 when this attempt may go ahead, else the seconds until one may."""
        bucket = self._by_address.get(address)
        if bucket is None:
            if len(self._by_address) >= MAX_TRACKED_ADDRESSES:
                self._by_address.pop(next(iter(self._by_address)))
            bucket = self._by_address[address] = TokenBucket(capacity=self.per_minute,
                                                             refill_per_s=self.per_minute / 60)
        return bucket.take() or self._everyone.take()


def build(config: AuthConfig) -> tuple[SessionStore, SignInLimiter]:
    return SessionStore(config.session_ttl_s, config.session_idle_s), SignInLimiter(config.sign_in_per_minute)
