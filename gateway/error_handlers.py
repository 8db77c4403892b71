"""Installs the one mapping from exceptions to an error envelope on the app: OpenAI's, or
the envelope registered for a path prefix (``app.state.error_envelopes``: Anthropic's on
``/v1/messages``), so a client gets its own API's error shape from every failure on its path,
an unknown method or sub-path included."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.errors import GatewayError, InvalidRequest, error_for_status, gateway_error_body

logger = logging.getLogger(__name__)


def error_response(error: GatewayError) -> JSONResponse:
    return JSONResponse(gateway_error_body(error), status_code=error.status_code, headers=error.headers)


def _respond(request: Request, error: GatewayError) -> JSONResponse:
    envelopes: dict[str, Callable[[GatewayError], JSONResponse]] = getattr(request.app.state, "error_envelopes", {})
    for prefix, respond in envelopes.items():
        if request.url.path.startswith(prefix):
            return respond(error)
    return error_response(error)


def validation_error(error_list: list[dict]) -> InvalidRequest:
    first = error_list[0] if error_list else {"loc": (), "msg": "invalid request"}
    location = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    param = ".".join(location) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "missing":
        message = "field required"
    return InvalidRequest(f"Invalid request: {param + ': ' if param else ''}{message}", param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, error: GatewayError) -> JSONResponse:
        return _respond(request, error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return _respond(request, validation_error(list(error.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _respond(request, error_for_status(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error", extra={"path": request.url.path})
        return _respond(request, GatewayError("The server had an error while processing your request."))
