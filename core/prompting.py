"""How a request's messages become the student's prompt, identically in training and serving.

Distillation removes prompt overhead: the app's long system prompt goes to the teacher, the
student sees only the route's short ``student.system_prompt`` plus the conversation.
"""

from __future__ import annotations

from typing import Any


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


def student_messages(system_prompt: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace the app's system/developer messages with the route's short student prompt."""
    conversation = [
        {"role": message["role"], "content": content_text(message.get("content"))}
        for message in messages
        if message.get("role") in ("user", "assistant")
    ]
    if system_prompt:
        return [{"role": "system", "content": system_prompt}, *conversation]
    return conversation
