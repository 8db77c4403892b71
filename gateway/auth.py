"""Bearer-key authentication for clients and the admin token for ``/admin/*``.

Keys are compared in constant time and never logged: a request is identified in the log
by a short hash of its key.

The dashboard's browser session is a server-side session (gateway/dashboard/sessions.py):
its HttpOnly, SameSite=Strict cookie holds a random id, never the token; sessions expire
and can be revoked. Because a cookie rides along on cross-site requests, a cookie alone only
authorises safe methods: a state-changing request must also carry the
``x-distillgate-dashboard`` header, which another origin's page cannot add without a CORS
preflight that this server never grants.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from gateway.errors import AuthenticationFailed, PermissionDenied


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def client_token(request: Request) -> str | None:
    """A client's key: ``Authorization: Bearer`` or, as Anthropic's clients send it, ``x-api-key``."""
    return bearer_token(request) or (request.headers.get("x-api-key") or "").strip() or None


def _matches(token: str, candidates: list[str]) -> bool:
    # Compare against every key, whatever the first result, so timing reveals nothing.
    found = False
    for candidate in candidates:
        found |= hmac.compare_digest(token.encode(), candidate.encode())
    return found


def constant_time_in(token: str, candidates: list[str]) -> bool:
    """Whether ``token`` is one of ``candidates``, compared in constant time."""
    return _matches(token, candidates)


ADMIN_COOKIE = "distillgate_admin"
DASHBOARD_HEADER = "x-distillgate-dashboard"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _cookie_admin(request: Request) -> str | None:
    cookie = request.cookies.get(ADMIN_COOKIE)
    sessions = getattr(request.app.state, "sessions", None)
    if not cookie or sessions is None:
        return None
    if request.method not in SAFE_METHODS and request.headers.get(DASHBOARD_HEADER) is None:
        return None
    session = sessions.get(cookie)
    return session.actor if session is not None else None


async def require_client(request: Request) -> str | None:
    """The caller's key id; raises 401 unless the key is configured (open when none are)."""
    keys: list[str] = request.app.state.client_keys
    if not keys and not getattr(request.app.state, "auth_required", False):
        return None
    token = client_token(request)
    if token is None:
        raise AuthenticationFailed("Missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>').")
    if not _matches(token, keys):
        raise AuthenticationFailed("Incorrect API key provided.")
    client_key_id = key_id(token)
    policies = getattr(request.app.state, "key_policies", None)
    if policies is not None:
        await policies.admit(client_key_id)  # the key's rate limit: 429 with retry-after
    return client_key_id


def require_admin(request: Request) -> str:
    """The admin's identity for the audit log; 401 without the admin token, 403 when the
    deployment configured none (the admin API is then off)."""
    admin_token: str | None = request.app.state.admin_token
    if admin_token is None:
        raise PermissionDenied("The admin API is disabled: set the admin token environment variable.")
    token = bearer_token(request)
    if token is not None and _matches(token, [admin_token]):
        return f"admin:{key_id(token)}"
    session = _cookie_admin(request)
    if session is None:
        raise AuthenticationFailed("This endpoint requires the admin token.")
    return session
