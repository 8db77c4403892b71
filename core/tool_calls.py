"""Tool calls as the student's text, and back: one format for training, serving and scoring.

The student is a plain text model: it learns to answer a tool-calling request with the
teacher's tool calls written as JSON — ``{"name": ..., "arguments": {...}}``, or a list of
them for parallel calls. Training targets (trainer/dataset.py), the student's prompt (an
earlier call in the conversation), the gateway's parse of the student's answer back into
OpenAI's ``tool_calls`` and the gate's comparison all use this module, so they agree.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection
from typing import Any


def _arguments(raw: Any) -> Any:
    """A call's arguments parsed from their JSON string (kept as given when not JSON)."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw if raw is not None else {}


def tool_calls_text(tool_calls: list[dict[str, Any]]) -> str:
    """OpenAI ``tool_calls`` as the student's answer text."""
    calls = [{"name": (call.get("function") or {}).get("name", ""),
              "arguments": _arguments((call.get("function") or {}).get("arguments"))} for call in tool_calls]
    return json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False, separators=(", ", ": "))


def _calls_in(text: str) -> list[dict[str, Any]] | None:
    """The ``{"name", "arguments"}`` objects ``text`` holds, or None when it holds no calls."""
    try:
        parsed = json.loads(text)
    except ValueError:
        return None
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not calls or not all(isinstance(call, dict) and isinstance(call.get("name"), str) and "arguments" in call
                            and set(call) <= {"name", "arguments"} for call in calls):
        return None
    return calls


def tool_call_key(text: str) -> str | None:
    """A comparison key for a tool-call answer: function names plus arguments parsed as JSON
    (key order and spacing do not matter); None when ``text`` is not a tool-call answer."""
    calls = _calls_in(text.strip())
    if calls is None:
        return None
    return json.dumps([{"name": call["name"], "arguments": _arguments(call["arguments"])} for call in calls],
                      sort_keys=True, ensure_ascii=False)


def parse_tool_calls(text: str, tool_names: Collection[str]) -> list[dict[str, Any]] | None:
    """The student's answer as OpenAI ``tool_calls`` when it calls only offered tools, else None."""
    calls = _calls_in(text.strip())
    if calls is None or not all(call["name"] in tool_names for call in calls):
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(_arguments(call["arguments"]),
                                                                        ensure_ascii=False)}}
            for call in calls]


def tool_names(tools: list[dict[str, Any]] | None) -> set[str]:
    """The function names a chat request offers."""
    return {(tool.get("function") or {}).get("name", "") for tool in tools or [] if isinstance(tool, dict)} - {""}


def tools_text(tools: list[dict[str, Any]]) -> str:
    """Tool definitions as the student reads them in its system message: compact JSON."""
    functions = [tool.get("function") or {} for tool in tools if isinstance(tool, dict)]
    described = [{key: function[key] for key in ("name", "description", "parameters") if key in function}
                 for function in functions]
    return "Tools: " + json.dumps(described, ensure_ascii=False, separators=(",", ":"))
