"""How a served stream is written on the wire: one seam, one implementation per client API.

The chat service relays OpenAI ``chat.completion.chunk`` dicts (already in the route's name)
whoever serves them; a :class:`StreamFormat` turns them into the bytes its API's clients
expect. Chat completions, the Responses API and Anthropic Messages each have one, so routing,
the cascade, shadowing and logging stay one code path for every API.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from gateway.chat import shapes
from gateway.errors import GatewayError, gateway_error_body


def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    """One server-sent event; ``event`` names it (the Responses and Messages APIs do)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {payload}\n\n".encode()


class StreamFormat(Protocol):
    def chunk(self, chunk: dict[str, Any]) -> list[bytes]:
        """Events for one outgoing ``chat.completion.chunk``."""
        ...

    def finish(self, usage: dict[str, int]) -> list[bytes]:
        """Events that close a stream that completed (``usage`` in OpenAI's chat shape)."""
        ...

    def error(self, error: GatewayError) -> list[bytes]:
        """Events that close a stream an upstream broke mid-answer."""
        ...


class ChatStreamFormat:
    """OpenAI chat completions: chunks as they are, an optional usage chunk, ``[DONE]``."""

    def __init__(self, route: str, include_usage: bool, chunk_id: str, created: int) -> None:
        self.route = route
        self.include_usage = include_usage
        self.chunk_id = chunk_id
        self.created = created

    def chunk(self, chunk: dict[str, Any]) -> list[bytes]:
        return [sse(chunk)]

    def finish(self, usage: dict[str, int]) -> list[bytes]:
        events = [sse(shapes.usage_chunk(self.route, self.chunk_id, self.created, usage))] if self.include_usage else []
        return [*events, sse("[DONE]")]

    def error(self, error: GatewayError) -> list[bytes]:
        return [sse(gateway_error_body(error))]


class ToolCallAccumulator:
    """Tool calls rebuilt from chat-chunk deltas (id and name first, arguments in pieces)."""

    def __init__(self) -> None:
        self.calls: dict[int, dict[str, Any]] = {}

    def add(self, deltas: list[dict[str, Any]]) -> list[tuple[int, bool, str]]:
        """Fold deltas in; returns ``(index, is_new, arguments_piece)`` for each delta."""
        seen = []
        for delta in deltas:
            index = int(delta.get("index", 0))
            function = delta.get("function") or {}
            is_new = index not in self.calls
            call = self.calls.setdefault(index, {"id": delta.get("id") or f"call_{index}", "name": "",
                                                 "arguments": ""})
            call["name"] += function.get("name") or ""
            piece = function.get("arguments") or ""
            call["arguments"] += piece
            seen.append((index, is_new, piece))
        return seen
