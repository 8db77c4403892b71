"""How a request's messages become the student's prompt, identically in training and serving.

Distillation removes prompt overhead: the app's long system prompt goes to the teacher, the
student sees only the route's short ``student.system_prompt`` plus the conversation.
"""

from __future__ import annotations

from typing import Any

from core.tool_calls import tool_calls_text, tools_text


def content_text(content: Any) -> str:
    """Text of a message's content: a string, or the text parts of a content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def user_text(messages: list[dict[str, Any]]) -> str:
    """The last user message's text: what the router embeds and the replay teacher looks up."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


def student_messages(system_prompt: str, messages: list[dict[str, Any]],
                     tools: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Replace the app's system/developer messages with the route's short student prompt.

    Tool traffic stays in: the offered tools are described in the system message, an
    assistant's earlier tool calls appear as the text the student itself would write, and
    tool results as ``tool`` turns (core/tool_calls.py), identically in training and serving.
    """
    conversation = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            conversation.append({"role": "assistant", "content": tool_calls_text(message["tool_calls"])})
        elif role in ("user", "assistant", "tool"):
            conversation.append({"role": role, "content": content_text(message.get("content"))})
    system = "\n".join(part for part in (system_prompt, tools_text(tools) if tools else "") if part)
    if system:
        return [{"role": "system", "content": system}, *conversation]
    return conversation


# The student reads the offered tools in its prompt; these fields are not sent to it.
TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")


def student_request(system_prompt: str, body: dict[str, Any]) -> dict[str, Any]:
    """A chat request body as the student gets it: its prompt, without the tool fields."""
    request = {key: value for key, value in body.items() if key not in TOOL_FIELDS}
    request["messages"] = student_messages(system_prompt, body["messages"], body.get("tools"))
    return request
