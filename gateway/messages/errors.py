"""Anthropic's error envelope on the Messages path: ``{"type": "error", "error": {"type",
"message"}}``, mapped from the gateway's one exception tree (gateway/errors.py).

The app registers :func:`anthropic_error_response` for the ``/v1/messages`` prefix, so every
failure there (auth, rate limit, validation, upstream, an unknown method) answers in
Anthropic's shape with the same status and headers.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from gateway.errors import GatewayError

# Anthropic's error types by HTTP status; anything else is an ``api_error``.
ERROR_TYPES = {400: "invalid_request_error", 405: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
               504: "timeout_error"}


def anthropic_error_body(error: GatewayError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(error.status_code, "api_error"),
                                       "message": error.message}}


def anthropic_error_response(error: GatewayError) -> JSONResponse:
    return JSONResponse(anthropic_error_body(error), status_code=error.status_code, headers=error.headers)

