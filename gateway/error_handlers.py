"""Installs the one mapping from exceptions to OpenAI's error envelope on the app."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.errors import GatewayError, InvalidRequest, error_for_status, gateway_error_body

logger = logging.getLogger(__name__)


def error_response(error: GatewayError) -> JSONResponse:
    return JSONResponse(gateway_error_body(error), status_code=error.status_code, headers=error.headers)


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
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(list(error.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error_for_status(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error", extra={"path": request.url.path})
        return error_response(GatewayError("The server had an error while processing your request."))
