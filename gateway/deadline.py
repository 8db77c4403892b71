"""Each chat request's overall deadline (``server.request_timeout_s``), streams included.

Set by the chat service when a request starts; read by the teacher client so that a retry
or a provider's ``retry-after`` wait that cannot finish in time is not started (the client
then gets the provider's 429 with its ``retry-after`` at once, not a 504 later). Times are
the event loop's clock (monotonic).
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar

_deadline: ContextVar[float | None] = ContextVar("distillgate_request_deadline", default=None)


def start(timeout_s: float) -> float:
    """Set this request's deadline ``timeout_s`` from now; returns it (loop time)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    _deadline.set(deadline)
    return deadline


def remaining_s() -> float | None:
    """Seconds left before this request's deadline; None outside a request."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - asyncio.get_running_loop().time()
