"""Limits on what a client can make the server hold: body size and time, header time.

* ``BodyLimits`` (ASGI middleware, every route): a declared ``content-length`` over
  ``server.max_body_bytes`` is refused with 413 before a byte of the body is read; a body
  sent without a length (chunked) is counted as it arrives and refused at the limit. A body
  whose arrival makes the server wait longer than ``server.body_timeout_s`` in all is 408.
* ``header_timeout_protocol``: uvicorn has no header timeout, so a client sending its
  request line and headers one byte at a time (slowloris) would hold a connection for ever.
  This subclass of uvicorn's httptools protocol closes a connection whose headers are not
  complete ``server.header_timeout_s`` after it opened or after the request's first byte,
  answering 408 (as Envoy's ``request_headers_timeout`` does).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi.responses import JSONResponse

from gateway.errors import GatewayError, PayloadTooLarge, RequestTimeout, gateway_error_body

logger = logging.getLogger(__name__)

Scope = dict[str, Any]


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")


class BodyLimits:
    """ASGI middleware bounding every request body's size and arrival time."""

    def __init__(self, app: Any, max_body_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await _refuse(_too_large(self.max_body_bytes), scope, receive, send)
            return
        await self.app(scope, self._bounded(receive), send)

    def _bounded(self, receive: Any) -> Any:
        received, waited_s, body_done = 0, 0.0, False
        loop = asyncio.get_running_loop()

        async def bounded_receive() -> dict[str, Any]:
            nonlocal received, waited_s, body_done
            if body_done:  # after the body only a disconnect can come: no bound on waiting for it
                return await receive()
            started = loop.time()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, self.body_timeout_s - waited_s))
            except TimeoutError:
                raise RequestTimeout(f"The request body did not arrive within {self.body_timeout_s:g} s.") from None
            waited_s += loop.time() - started
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_body_bytes:
                    raise _too_large(self.max_body_bytes)
            else:
                body_done = True
            return message

        return bounded_receive


async def _refuse(error: GatewayError, scope: Scope, receive: Any, send: Any) -> None:
    logger.info("request refused before its body was read", extra={"path": scope.get("path"),
                                                                    "status": error.status_code})
    headers = {**error.headers, "connection": "close"}
    response = JSONResponse(gateway_error_body(error), status_code=error.status_code, headers=headers)
    await response(scope, receive, send)


def header_timeout_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with a deadline for each request's line and headers."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                logger.info("connection closed: request headers too slow",
                            extra={"client": self.client[0] if self.client else None, "timeout_s": header_timeout_s})
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol
