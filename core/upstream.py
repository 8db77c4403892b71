"""Seams for the upstreams and the result shape both return."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from core.tool_calls import tool_calls_text


class UpstreamFailure(Exception):
    """An upstream could not answer. ``retryable`` marks 429/5xx/connection/timeout;
    ``retry_after_s`` is the wait the provider asked for (its ``retry-after``), when it did.

    ``server_fault`` says whether the upstream itself is to blame (5xx, timeout, connection
    error, a malformed answer) rather than the request (4xx: a prompt too long, an unloaded
    adapter) or the gateway's own limits (its connection pool full). Circuit breakers count
    only server faults, as Envoy's outlier detection counts gateway failures.
    ``unreached`` says the request never reached the server (its connection was refused), so
    another server may safely be asked instead.
    """

    def __init__(self, message: str, *, status_code: int | None = None, timeout: bool = False,
                 retryable: bool = False, server_fault: bool | None = None,
                 retry_after_s: float | None = None, unreached: bool = False) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.timeout = timeout
        self.retryable = retryable
        self.server_fault = (status_code is None or status_code >= 500) if server_fault is None else server_fault
        self.retry_after_s = retry_after_s
        self.unreached = unreached


@dataclass
class Completion:
    """A non-streamed answer in OpenAI's ``chat.completion`` shape, plus accounting."""

    body: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    latency_ms: float
    model: str

    @property
    def text(self) -> str:
        """The answer as compared: its content, or its tool calls as the student writes them."""
        choices = self.body.get("choices") or [{}]
        message = choices[0].get("message") or {}
        if message.get("tool_calls"):
            return tool_calls_text(message["tool_calls"])
        return message.get("content") or ""


class StudentBackend(Protocol):
    async def chat(self, model: str, body: dict[str, Any], timeout_s: float) -> Completion: ...

    def stream(self, model: str, body: dict[str, Any], timeout_s: float) -> AsyncIterator[dict[str, Any]]: ...

    async def healthy(self) -> bool: ...

    async def load_adapter(self, name: str, path: str) -> None: ...

    async def unload_adapter(self, name: str) -> None: ...

    async def aclose(self) -> None: ...


class TeacherClient(Protocol):
    model: str

    async def chat(self, body: dict[str, Any]) -> Completion: ...

    def stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float: ...

    async def healthy(self) -> bool: ...
