"""``/openapi.json`` of a running gateway is self-contained: every ``$ref`` resolves, and the
chat body is a real schema that client generators and fuzzers can read."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx

from core.config import Settings
from gateway.app import create_app
from tests.helpers import UvicornThread


def _refs(node: Any, path: str = "#") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield path, value
            else:
                yield from _refs(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _refs(item, f"{path}/{index}")


def _resolve(document: dict[str, Any], ref: str) -> Any:
    """A local JSON pointer (RFC 6901) in the document; KeyError/IndexError when it dangles."""
    assert ref.startswith("#/"), f"not a local reference: {ref}"
    node: Any = document
    for token in ref[2:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        node = node[int(token)] if isinstance(node, list) else node[token]
    return node


def test_every_ref_in_openapi_json_resolves(make_settings: Callable[..., Settings], replay_teacher: str) -> None:
    with UvicornThread(create_app(make_settings(replay_teacher))) as server:
        document = httpx.get(f"{server.url}/openapi.json").json()
    refs = list(_refs(document))
    assert refs, "the document has references to check"
    dangling = []
    for where, ref in refs:
        try:
            _resolve(document, ref)
        except (KeyError, IndexError, ValueError, AssertionError):
            dangling.append((where, ref))
    assert dangling == []
    body = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    message = body["properties"]["messages"]["items"]
    assert message["required"] == ["role"] and "user" in message["properties"]["role"]["enum"]
