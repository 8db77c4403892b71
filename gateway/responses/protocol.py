"""Wire format of the Responses API and its translation to the internal chat request.

A Responses request becomes a chat completion request (``instructions`` a system message,
``input`` items messages, tool calls and tool outputs), so routing, the cascade, shadowing,
logging and training are the chat service's one code path. Fields with no chat meaning
(``store``, ``include``, ``truncation``, ...) are accepted and ignored, as vLLM does.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gateway.errors import InvalidRequest

logger = logging.getLogger(__name__)

MESSAGE_ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text", "refusal")
# Responses fields with a chat counterpart of the same name and meaning.
SAME_NAME = ("temperature", "top_p", "user", "parallel_tool_calls", "top_logprobs")


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_output_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    previous_response_id: str | None = None

    def chat_payload(self) -> dict[str, Any]:
        """The equivalent chat completion request body."""
        if self.previous_response_id is not None:
            raise InvalidRequest("previous_response_id is not supported: responses are not stored; send the "
                                 "conversation as input items.", param="previous_response_id")
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        messages += input_messages(self.input)
        if not messages:
            raise InvalidRequest("input must hold at least one message.", param="input")
        payload: dict[str, Any] = {"model": self.model, "messages": messages, "stream": self.stream}
        payload.update({name: getattr(self, name) for name in SAME_NAME if getattr(self, name) is not None})
        if self.top_logprobs:
            payload["logprobs"] = True
        if self.max_output_tokens is not None:
            payload["max_tokens"] = self.max_output_tokens
        if self.stream:
            payload["stream_options"] = {"include_usage": True}
        if self.tools:
            payload["tools"] = [chat_tool(tool, index) for index, tool in enumerate(self.tools)]
        if self.tool_choice is not None:
            payload["tool_choice"] = chat_tool_choice(self.tool_choice)
        response_format = chat_response_format((self.text or {}).get("format"))
        if response_format is not None:
            payload["response_format"] = response_format
        if self.model_extra:
            logger.debug("responses fields ignored", extra={"fields": sorted(self.model_extra)})
        return payload


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``input`` as chat messages: a string is one user message; items map one by one, and
    consecutive function calls become one assistant message with several ``tool_calls``."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        kind = item.get("type") or "message"
        if kind == "message":
            messages.append(_message(item, index))
        elif kind == "function_call":
            call = {"id": item.get("call_id") or item.get("id") or f"call_{index}", "type": "function",
                    "function": {"name": item.get("name", ""), "arguments": item.get("arguments") or "{}"}}
            previous = messages[-1] if messages else None
            if previous is not None and previous["role"] == "assistant" and previous.get("tool_calls"):
                previous["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id", ""),
                             "content": output if isinstance(output, str) else _text(output or [], index)})
        else:
            raise InvalidRequest(f"input items of type `{kind}` are not supported.", param=f"input.{index}.type")
    return messages


def _message(item: dict[str, Any], index: int) -> dict[str, Any]:
    role = item.get("role")
    if role not in MESSAGE_ROLES:
        raise InvalidRequest(f"role must be one of {', '.join(MESSAGE_ROLES)}.", param=f"input.{index}.role")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise InvalidRequest("content must be a string or a list of content parts.", param=f"input.{index}.content")
    if all(part.get("type") in TEXT_PARTS for part in content if isinstance(part, dict)):
        return {"role": role, "content": _text(content, index)}
    return {"role": role, "content": [_part(part, index) for part in content]}


def _text(parts: list[Any], index: int) -> str:
    return "".join(_part(part, index).get("text", "") for part in parts)


def _part(part: Any, index: int) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in TEXT_PARTS:
        return {"type": "text", "text": part.get("text") or part.get("refusal") or ""}
    if kind == "input_image" and part.get("image_url"):
        return {"type": "image_url", "image_url": {"url": part["image_url"], "detail": part.get("detail", "auto")}}
    raise InvalidRequest(f"content parts of type `{kind}` are not supported.", param=f"input.{index}.content")


def chat_tool(tool: dict[str, Any], index: int) -> dict[str, Any]:
    """A Responses function tool (flat) as a chat tool (nested under ``function``)."""
    if tool.get("type") != "function" or not tool.get("name"):
        raise InvalidRequest("only function tools (type `function` with a name) are supported.",
                             param=f"tools.{index}")
    function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if tool.get(key) is not None}
    return {"type": "function", "function": function}


def chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and choice.get("name"):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidRequest("tool_choice must be none, auto, required or a function.", param="tool_choice")


def chat_response_format(text_format: Any) -> dict[str, Any] | None:
    """``text.format`` as chat's ``response_format``; None for plain text."""
    if text_format is not None and not isinstance(text_format, dict):
        raise InvalidRequest("text.format must be an object.", param="text.format")
    if not text_format or text_format.get("type") == "text":
        return None
    if text_format.get("type") == "json_object":
        return {"type": "json_object"}
    if text_format.get("type") == "json_schema":
        schema = {key: text_format[key] for key in ("name", "schema", "strict", "description") if key in text_format}
        return {"type": "json_schema", "json_schema": schema}
    raise InvalidRequest("text.format must be text, json_object or json_schema.", param="text.format")
