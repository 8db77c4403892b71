"""Chat answers → Anthropic's shapes: the ``message`` object and its event stream.

Content blocks: one ``text`` block for the answer's text, then one ``tool_use`` block per
tool call (arguments parsed as JSON into ``input``). Stop reasons map from chat's
finish reasons.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from gateway.chat.stream_format import ToolCallAccumulator, sse
from gateway.errors import GatewayError
from gateway.messages.errors import anthropic_error_body

logger = logging.getLogger(__name__)

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def stop_reason(finish_reason: str | None) -> str:
    return STOP_REASONS.get(finish_reason or "stop", "end_turn")


def tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's JSON arguments as the ``input`` object Anthropic's clients expect."""
    try:
        parsed = json.loads(arguments or "{}")
    except ValueError:
        logger.warning("tool call arguments are not JSON; sent as an empty input", extra={"arguments": arguments[:200]})
        return {}
    return parsed if isinstance(parsed, dict) else {"value": parsed}


def message_body(chat: dict[str, Any], model: str) -> dict[str, Any]:
    """A served ``chat.completion`` as an Anthropic ``message``."""
    choice = (chat.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = [{"type": "text", "text": message["content"]}] if message.get("content") else []
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or f"toolu_{uuid.uuid4().hex}",
                        "name": function.get("name", ""), "input": tool_input(function.get("arguments") or "")})
    usage = chat.get("usage") or {}
    return {"id": new_message_id(), "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason(choice.get("finish_reason")), "stop_sequence": None,
            "usage": {"input_tokens": int(usage.get("prompt_tokens") or 0),
                      "output_tokens": int(usage.get("completion_tokens") or 0)}}


class MessagesStreamFormat:
    """Anthropic's named events from chat chunks: ``message_start``, per block
    ``content_block_start`` / ``content_block_delta`` / ``content_block_stop``, then
    ``message_delta`` (stop reason, usage) and ``message_stop``; ``error`` when an upstream
    breaks mid-answer."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.started = False
        self.blocks = 0  # content blocks opened so far; the open one is the last
        self.open_kind: str | None = None
        self.calls = ToolCallAccumulator()
        self.call_blocks: dict[int, int] = {}
        self.finish_reason: str | None = None

    @staticmethod
    def _event(kind: str, **fields: Any) -> bytes:
        return sse({"type": kind, **fields}, event=kind)

    def _start(self) -> list[bytes]:
        if self.started:
            return []
        self.started = True
        message = {"id": new_message_id(), "type": "message", "role": "assistant", "model": self.model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": 0, "output_tokens": 0}}
        return [self._event("message_start", message=message)]

    def _open(self, kind: str, block: dict[str, Any]) -> list[bytes]:
        events = self._close()
        self.open_kind = kind
        self.blocks += 1
        return [*events, self._event("content_block_start", index=self.blocks - 1, content_block=block)]

    def _close(self) -> list[bytes]:
        if self.open_kind is None:
            return []
        self.open_kind = None
        return [self._event("content_block_stop", index=self.blocks - 1)]

    def chunk(self, chunk: dict[str, Any]) -> list[bytes]:
        events = self._start()
        choice = chunk["choices"][0]
        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        delta = choice.get("delta") or {}
        if delta.get("content"):
            if self.open_kind != "text":
                events += self._open("text", {"type": "text", "text": ""})
            events.append(self._event("content_block_delta", index=self.blocks - 1,
                                      delta={"type": "text_delta", "text": delta["content"]}))
        for index, is_new, piece in self.calls.add(delta.get("tool_calls") or []):
            if is_new:
                call = self.calls.calls[index]
                events += self._open("tool_use", {"type": "tool_use", "id": call["id"], "name": call["name"],
                                                  "input": {}})
                self.call_blocks[index] = self.blocks - 1
            if piece and self.call_blocks[index] == self.blocks - 1 and self.open_kind == "tool_use":
                events.append(self._event("content_block_delta", index=self.blocks - 1,
                                          delta={"type": "input_json_delta", "partial_json": piece}))
        return events

    def finish(self, usage: dict[str, int]) -> list[bytes]:
        events = self._start() + self._close()
        delta = {"stop_reason": stop_reason(self.finish_reason), "stop_sequence": None}
        counts = {"input_tokens": usage.get("prompt_tokens", 0), "output_tokens": usage.get("completion_tokens", 0)}
        return [*events, self._event("message_delta", delta=delta, usage=counts), self._event("message_stop")]

    def error(self, error: GatewayError) -> list[bytes]:
        return [*self._start(), sse(anthropic_error_body(error), event="error")]
