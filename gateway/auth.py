"""Bearer-key authentication for clients and the admin token for ``/admin/*``.

Keys are compared in constant time and never logged: a request is identified in the log
by a short hash of its key.
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


def _matches(token: str, candidates: list[str]) -> bool:
    # Compare against every key, whatever the first result, so timing reveals nothing.
    found = False
    for candidate in candidates:
        found |= hmac.compare_digest(token.encode(), candidate.encode())
    return found


def require_client(request: Request) -> str | None:
    """The caller's key id; raises 401 unless the key is configured (open when none are)."""
    keys: list[str] = request.app.state.client_keys
    if not keys:
        return None
    token = bearer_token(request)
    if token is None:
        raise AuthenticationFailed("Missing API key: send 'Authorization: Bearer <key>'.")
    if not _matches(token, keys):
        raise AuthenticationFailed("Incorrect API key provided.")
    return key_id(token)


def require_admin(request: Request) -> str:
    """The admin's identity for the audit log; 401 without the admin token, 403 when the
    deployment configured none (the admin API is then off)."""
    admin_token: str | None = request.app.state.admin_token
    if admin_token is None:
        raise PermissionDenied("The admin API is disabled: set the admin token environment variable.")
    token = bearer_token(request)
    if token is None or not _matches(token, [admin_token]):
        raise AuthenticationFailed("This endpoint requires the admin token.")
    return f"admin:{key_id(token)}"
