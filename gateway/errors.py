"""Domain exceptions and their one mapping to OpenAI's error envelope.

Exception tree::

    GatewayError                    500 server_error
    ├── InvalidRequest              400 invalid_request_error
    │   ├── PayloadTooLarge         413 invalid_request_error
    │   └── RequestTimeout          408 invalid_request_error (the client sent its body too slowly)
    ├── AuthenticationFailed        401 authentication_error
    ├── PermissionDenied            403 permission_error
    ├── RouteNotFound               404 invalid_request_error (code model_not_found)
    ├── NotFound                    404 invalid_request_error
    ├── Conflict                    409 invalid_request_error
    ├── RateLimited                 429 rate_limit_error
    │   └── BudgetExceeded          429 insufficient_quota (code budget_exceeded)
    ├── Unavailable                 503 service_unavailable
    └── UpstreamError               502 upstream_error
        └── UpstreamTimeout         504 upstream_timeout

Handlers raise these; only :func:`error_body` builds a body, so every endpoint answers in
one shape that the OpenAI SDK parses.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    status_code = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers or {}


class InvalidRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    status_code = 413
    default_code = "request_too_large"


class RequestTimeout(InvalidRequest):
    status_code = 408
    default_code = "request_timeout"


class AuthenticationFailed(GatewayError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status_code = 403
    error_type = "permission_error"


class RouteNotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class NotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class Conflict(GatewayError):
    status_code = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


class RateLimited(GatewayError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class BudgetExceeded(RateLimited):
    """A client key has spent its monthly budget. OpenAI answers an exhausted quota with a
    429 of type ``insufficient_quota``; retrying does not help until the month turns."""

    error_type = "insufficient_quota"
    default_code = "budget_exceeded"


class Unavailable(GatewayError):
    status_code = 503
    error_type = "service_unavailable"


class UpstreamError(GatewayError):
    status_code = 502
    error_type = "upstream_error"
    default_code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status_code = 504
    error_type = "upstream_timeout"
    default_code = "upstream_timeout"


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def gateway_error_body(error: GatewayError) -> dict[str, Any]:
    return error_body(error.message, error.error_type, error.param, error.code)


STATUS_TO_ERROR: dict[int, type[GatewayError]] = {
    400: InvalidRequest,
    401: AuthenticationFailed,
    403: PermissionDenied,
    404: NotFound,
    405: InvalidRequest,
    408: RequestTimeout,
    413: PayloadTooLarge,
    422: InvalidRequest,
    429: RateLimited,
    503: Unavailable,
}


def error_for_status(status_code: int, message: str) -> GatewayError:
    """The domain error for a framework-level HTTP error (unknown path, wrong method)."""
    error_class = STATUS_TO_ERROR.get(status_code, GatewayError)
    error = error_class(message)
    error.status_code = status_code
    return error
