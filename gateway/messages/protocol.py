"""Wire format of Anthropic's Messages API and its translation to the internal chat request.

``system`` becomes a system message; content blocks become chat content (text, images),
``tool_use`` blocks an assistant message's ``tool_calls`` and ``tool_result`` blocks tool
messages; tools and ``tool_choice`` map to their chat forms. So routing, the cascade,
shadowing, logging and training are the chat service's one code path. ``top_k`` and
``thinking`` have no chat counterpart and are ignored.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gateway.errors import InvalidRequest

logger = logging.getLogger(__name__)


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = Field(None, max_length=4)
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None

    def chat_payload(self) -> dict[str, Any]:
        """The equivalent chat completion request body."""
        messages = [{"role": "system", "content": system_text(self.system)}] if self.system else []
        for index, message in enumerate(self.messages):
            messages += chat_messages(message, index)
        payload: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                                   "stream": self.stream}
        for name in ("temperature", "top_p"):
            if getattr(self, name) is not None:
                payload[name] = getattr(self, name)
        if self.stop_sequences:
            payload["stop"] = self.stop_sequences
        if self.stream:
            payload["stream_options"] = {"include_usage": True}
        if self.tools:
            payload["tools"] = [chat_tool(tool, index) for index, tool in enumerate(self.tools)]
        if self.tool_choice is not None:
            payload["tool_choice"] = chat_tool_choice(self.tool_choice)
        user_id = (self.metadata or {}).get("user_id")
        if isinstance(user_id, str):
            payload["user"] = user_id
        return payload


def system_text(system: str | list[dict[str, Any]]) -> str:
    if isinstance(system, str):
        return system
    return "\n".join(block.get("text", "") for block in system if block.get("type") == "text")


def chat_messages(message: dict[str, Any], index: int) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages: tool results first (as tool messages), then the
    text and images, with an assistant's ``tool_use`` blocks as ``tool_calls``."""
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise InvalidRequest("role must be user or assistant.", param=f"messages.{index}.role")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise InvalidRequest("content must be a string or a list of content blocks.",
                             param=f"messages.{index}.content")
    tool_messages, parts, tool_calls = [], [], []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "tool_result" and role == "user":
            tool_messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id", ""),
                                  "content": _result_text(block.get("content"))})
        elif kind == "tool_use" and role == "assistant":
            tool_calls.append({"id": block.get("id", ""), "type": "function",
                               "function": {"name": block.get("name", ""),
                                            "arguments": json.dumps(block.get("input") or {})}})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # the model's own reasoning: nothing for the next model to read
        else:
            parts.append(_part(block, kind, index))
    return tool_messages + _content_message(role, parts, tool_calls)


def _content_message(role: str, parts: list[dict[str, Any]], tool_calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not parts and not tool_calls:
        return []
    text_only = all(part["type"] == "text" for part in parts)
    content: Any = "".join(part["text"] for part in parts) if text_only else parts
    message: dict[str, Any] = {"role": role, "content": content if content != "" or not tool_calls else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return [message]


def _part(block: Any, kind: str | None, index: int) -> dict[str, Any]:
    if kind == "text":
        return {"type": "text", "text": block.get("text", "")}
    source = block.get("source") if kind == "image" else None
    if isinstance(source, dict) and source.get("type") == "base64":
        return {"type": "image_url", "image_url": {"url": f"data:{source.get('media_type')};base64,{source.get('data')}"}}
    if isinstance(source, dict) and source.get("type") == "url":
        return {"type": "image_url", "image_url": {"url": source.get("url")}}
    raise InvalidRequest(f"content blocks of type `{kind}` are not supported here.", param=f"messages.{index}.content")


def _result_text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(block.get("text", "") for block in content if isinstance(block, dict))
    return content if isinstance(content, str) else ""


def chat_tool(tool: dict[str, Any], index: int) -> dict[str, Any]:
    """An Anthropic client tool (``name``, ``description``, ``input_schema``) as a chat tool."""
    if not tool.get("name") or tool.get("type") not in (None, "custom"):
        raise InvalidRequest("only client tools (with a name and an input_schema) are supported.",
                             param=f"tools.{index}")
    function = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
    if tool.get("description"):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def chat_tool_choice(choice: dict[str, Any]) -> str | dict[str, Any]:
    kind = choice.get("type")
    if kind in ("auto", "none"):
        return kind
    if kind == "any":
        return "required"
    if kind == "tool" and choice.get("name"):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidRequest("tool_choice type must be auto, any, tool or none.", param="tool_choice")
