"""OpenAI's wire format as both httpx upstreams read it: a completion body, an SSE line.

``who`` names the upstream in the failure's message ("student", "teacher openai/x"). Both
failures are retryable server faults: a malformed answer is the upstream's, not the request's.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from core.upstream import UpstreamFailure


def parse_completion(response: httpx.Response, who: str) -> dict[str, Any]:
    """A ``chat.completion`` body with at least one choice; raises UpstreamFailure otherwise."""
    try:
        data = response.json()
    except ValueError as error:
        raise UpstreamFailure(f"{who} returned a body that is not JSON", retryable=True) from error
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        raise UpstreamFailure(f"{who} returned a malformed completion", retryable=True)
    return data


def parse_sse_line(line: str, who: str) -> dict[str, Any] | None:
    """The chunk a ``data:`` line carries; None for other lines and the ``[DONE]`` sentinel."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    try:
        chunk = json.loads(data)
    except ValueError as error:
        raise UpstreamFailure(f"{who} streamed a chunk that is not JSON", retryable=True) from error
    if not isinstance(chunk, dict):
        raise UpstreamFailure(f"{who} streamed a chunk that is not an object", retryable=True)
    if "error" in chunk:
        raise UpstreamFailure(f"{who} stream error: {chunk['error']}", retryable=True)
    return chunk
