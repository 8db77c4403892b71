"""Chat answers → the Responses API's shapes: the ``response`` object and its event stream.

Output items: one ``message`` item with one ``output_text`` part for the answer's text, then
one ``function_call`` item per tool call. ``finish_reason: length`` is status ``incomplete``
(``max_output_tokens``), as OpenAI reports it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from gateway.chat.stream_format import ToolCallAccumulator, sse
from gateway.errors import GatewayError
from gateway.responses.protocol import ResponsesRequest


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage_body(usage: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def base_response(request: ResponsesRequest, response_id: str, created_at: float, status: str) -> dict[str, Any]:
    """A ``response`` object with no output yet; the request's settings echoed back."""
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": status,
        "model": request.model, "output": [], "error": None, "incomplete_details": None,
        "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
        "parallel_tool_calls": request.parallel_tool_calls if request.parallel_tool_calls is not None else True,
        "temperature": request.temperature, "top_p": request.top_p,
        "tool_choice": request.tool_choice if request.tool_choice is not None else "auto",
        "tools": request.tools or [], "text": request.text or {"format": {"type": "text"}},
        "metadata": request.metadata or {}, "previous_response_id": None, "reasoning": None,
        "user": request.user, "usage": None, "completed_at": None,
    }


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status != "in_progress" else []
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def function_call_item(item_id: str, call: dict[str, Any], status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call["id"], "name": call["name"],
            "arguments": call["arguments"], "status": status}


def finished(response: dict[str, Any], output: list[dict[str, Any]], usage: dict[str, Any],
             finish_reason: str | None) -> dict[str, Any]:
    """``response`` completed (or incomplete at the token limit) with its output and usage."""
    incomplete = finish_reason == "length"
    return {**response, "status": "incomplete" if incomplete else "completed", "output": output,
            "usage": usage_body(usage), "completed_at": time.time(),
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None}


def response_body(chat: dict[str, Any], request: ResponsesRequest) -> dict[str, Any]:
    """A served ``chat.completion`` as a Responses API ``response``."""
    choice = (chat.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    output = [message_item(new_id("msg"), message["content"], "completed")] if message.get("content") else []
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        output.append(function_call_item(new_id("fc"), {"id": call.get("id"), "name": function.get("name", ""),
                                                        "arguments": function.get("arguments") or ""}, "completed"))
    response = base_response(request, new_id("resp"), float(chat.get("created") or time.time()), "in_progress")
    return finished(response, output, chat.get("usage") or {}, choice.get("finish_reason"))


class ResponsesStreamFormat:
    """The Responses API's named events from chat chunks: ``response.created`` and
    ``response.in_progress``, then per item ``output_item.added`` / deltas / ``.done``, then
    ``response.completed`` (or ``error`` and ``response.failed``)."""

    def __init__(self, request: ResponsesRequest) -> None:
        self.response = base_response(request, new_id("resp"), time.time(), "in_progress")
        self.sequence = 0
        self.started = False
        self.output: list[dict[str, Any]] = []
        self.open_item: dict[str, Any] | None = None
        self.text: list[str] = []
        self.calls = ToolCallAccumulator()
        self.call_items: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None

    def _event(self, kind: str, **fields: Any) -> bytes:
        self.sequence += 1
        return sse({"type": kind, "sequence_number": self.sequence - 1, **fields}, event=kind)

    def _start(self) -> list[bytes]:
        if self.started:
            return []
        self.started = True
        return [self._event("response.created", response=self.response),
                self._event("response.in_progress", response=self.response)]

    def chunk(self, chunk: dict[str, Any]) -> list[bytes]:
        events = self._start()
        choice = chunk["choices"][0]
        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        delta = choice.get("delta") or {}
        if delta.get("content"):
            events += self._text_delta(delta["content"])
        for index, is_new, piece in self.calls.add(delta.get("tool_calls") or []):
            events += self._call_delta(index, is_new, piece)
        return events

    def _text_delta(self, piece: str) -> list[bytes]:
        events = []
        if self.open_item is None or self.open_item["type"] != "message":
            events += self._close_item()
            self.open_item = message_item(new_id("msg"), "", "in_progress")
            events.append(self._event("response.output_item.added", output_index=len(self.output), item=self.open_item))
            events.append(self._event("response.content_part.added", item_id=self.open_item["id"],
                                      output_index=len(self.output), content_index=0,
                                      part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))
        self.text.append(piece)
        events.append(self._event("response.output_text.delta", item_id=self.open_item["id"],
                                  output_index=len(self.output), content_index=0, delta=piece, logprobs=[]))
        return events

    def _call_delta(self, index: int, is_new: bool, piece: str) -> list[bytes]:
        events = []
        if is_new:
            events += self._close_item()
            self.open_item = function_call_item(new_id("fc"), self.calls.calls[index], "in_progress")
            self.call_items[index] = self.open_item
            events.append(self._event("response.output_item.added", output_index=len(self.output), item=self.open_item))
        item = self.call_items[index]
        if piece and item is self.open_item:
            events.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                      output_index=len(self.output), delta=piece))
        return events

    def _close_item(self) -> list[bytes]:
        item, self.open_item = self.open_item, None
        if item is None:
            return []
        index = len(self.output)
        if item["type"] == "message":
            text, self.text = "".join(self.text), []
            done = message_item(item["id"], text, "completed")
            part = done["content"][0]
            events = [self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                  content_index=0, text=text, logprobs=[]),
                      self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                  content_index=0, part=part)]
        else:
            call = next(call for number, call in self.calls.calls.items() if self.call_items[number] is item)
            done = function_call_item(item["id"], call, "completed")
            events = [self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                  name=call["name"], arguments=call["arguments"])]
        self.output.append(done)
        return [*events, self._event("response.output_item.done", output_index=index, item=done)]

    def finish(self, usage: dict[str, int]) -> list[bytes]:
        events = self._start() + self._close_item()
        response = finished(self.response, self.output, usage, self.finish_reason)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return [*events, self._event(kind, response=response)]

    def error(self, error: GatewayError) -> list[bytes]:
        failed = {**self.response, "status": "failed", "output": self.output,
                  "error": {"code": "server_error", "message": error.message}}
        return [*self._start(), self._event("error", code=error.code, message=error.message, param=error.param),
                self._event("response.failed", response=failed)]
