"""The replay teacher's tool calls: a request that offers tools is answered as a frontier
model would, with an OpenAI ``tool_calls`` answer that calls the tool named after the
utterance's intent.

* Which tool: the utterance's label, with the teacher's accuracy noise applied as for a
  plain answer (the same ``(seed, utterance)`` hash decides whether it is wrong); a wrong
  answer picks among the offered tools and ``oos``, so a mistake is a plausible one.
* ``tool_choice``: ``"none"`` answers the label as text, as without tools; a named function
  is always called; ``"required"`` calls the answer's tool, or when the answer is not an
  offered tool (an out-of-scope utterance, an intent not offered) the offered tool a hash of
  the utterance picks; ``"auto"`` (the default) calls the answer's tool when it is offered,
  otherwise answers with the label as text (``oos`` for an out-of-scope utterance): a model
  that does not call a tool that does not fit.
* Arguments: a pure function of the tool's declared parameters and the utterance. Each
  declared ``integer`` or ``number`` property gets the first number the utterance holds
  (left out when it holds none); other properties are left out, and a tool without
  properties is called with ``{}``.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from core.answers import normalize_answer
from core.tool_calls import tool_names

if TYPE_CHECKING:
    from harness.replay_teacher import LabelBook

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def offered_functions(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """The offered function definitions by name."""
    functions = [tool.get("function") or {} for tool in tools or [] if isinstance(tool, dict)]
    return {function["name"]: function for function in functions if isinstance(function.get("name"), str)}


def tool_arguments(function: dict[str, Any], utterance: str) -> dict[str, Any]:
    """The arguments the teacher passes to ``function`` for ``utterance`` (see the module doc)."""
    properties = ((function.get("parameters") or {}).get("properties") or {})
    number = _NUMBER.search(utterance)
    arguments: dict[str, Any] = {}
    for name, schema in properties.items():
        kind = (schema or {}).get("type")
        if number and kind in ("integer", "number"):
            value = float(number.group())
            arguments[name] = int(value) if kind == "integer" or value.is_integer() else value
    return arguments


def _forced_name(tool_choice: Any) -> str | None:
    if isinstance(tool_choice, dict):
        return (tool_choice.get("function") or {}).get("name")
    return None


def decide_call(book: LabelBook, utterance: str, tools: list[dict[str, Any]] | None, tool_choice: Any,
                accuracy: float, seed: int) -> tuple[str | None, str]:
    """``(tool to call or None, the text answer when none is called)`` for a request."""
    from harness.replay_teacher import OUT_OF_SCOPE, _unit_hash

    offered = sorted(tool_names(tools))
    if not offered or tool_choice == "none":
        return None, book.answer(utterance, accuracy, seed)
    forced = _forced_name(tool_choice)
    if forced is not None:
        return forced, ""
    answer = book.answer(utterance, accuracy, seed, candidates=[*offered, OUT_OF_SCOPE])
    if answer in offered:
        return answer, ""
    if tool_choice == "required":
        return offered[int(_unit_hash(seed, "required", normalize_answer(utterance)) * len(offered))], ""
    return None, answer


def tool_calls_answer(name: str, function: dict[str, Any], utterance: str, call_id: str) -> list[dict[str, Any]]:
    """One call in OpenAI's ``tool_calls`` shape (arguments as a JSON string)."""
    arguments = json.dumps(tool_arguments(function, utterance), separators=(",", ":"))
    return [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]
