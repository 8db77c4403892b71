"""HTTP route for chat completions: read, bound, parse, validate, hand to the service."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from gateway.auth import require_client
from gateway.chat.protocol import ChatCompletionRequest
from gateway.chat.service import ChatService
from gateway.error_handlers import validation_error
from gateway.errors import InvalidRequest, PayloadTooLarge

endpoints = APIRouter()

def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """The model's JSON schema with its ``$defs`` inlined: pydantic's ``#/$defs/...`` refs
    resolve against the document root, and in the OpenAPI document that root has no
    ``$defs``, so client generators and fuzzers could not read the body. The chat models are
    not recursive, so inlining terminates."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any, seen: tuple[str, ...] = ()) -> Any:
        if isinstance(node, list):
            return [resolve(item, seen) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            name = ref.removeprefix("#/$defs/")
            if name in seen:
                raise ValueError(f"recursive schema {name}: cannot inline")
            rest = {key: value for key, value in node.items() if key != "$ref"}
            return {**resolve(defs[name], (*seen, name)), **resolve(rest, seen)}
        return {key: resolve(value, seen) for key, value in node.items()}

    return resolve(schema)


REQUEST_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": _inlined(ChatCompletionRequest.model_json_schema())}},
    }
}


async def read_json_body(request: Request) -> Any:
    """The body as JSON, refusing oversized bodies before reading them whole."""
    limit: int = request.app.state.settings.server.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        payload = json.loads(raw)
    except UnicodeDecodeError:
        raise InvalidRequest("Request body is not valid UTF-8.") from None
    except (ValueError, RecursionError):
        raise InvalidRequest("Request body is not valid JSON.") from None
    if SURROGATE_ESCAPE.search(raw):
        _refuse_lone_surrogates(payload)
    return payload


# JSON may spell a lone UTF-16 surrogate ("\ud800"), which json.loads accepts but no UTF-8
# encoder (the log, the spool, the upstream call) can write. Checked only when the body
# holds such an escape at all; a valid pair (an escaped emoji) decodes to one code point.
SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")


def _refuse_lone_surrogates(payload: Any) -> None:
    try:
        json.dumps(payload, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise InvalidRequest("Request body holds a lone UTF-16 surrogate, which is not valid Unicode.") from None


def parse_chat_request(payload: Any, max_tokens_limit: int) -> ChatCompletionRequest:
    if not isinstance(payload, dict):
        raise InvalidRequest("Request body must be a JSON object.")
    try:
        chat_request = ChatCompletionRequest.model_validate(payload)
    except ValidationError as error:
        raise validation_error(list(error.errors())) from None
    for field in ("max_tokens", "max_completion_tokens"):
        value = getattr(chat_request, field)
        if value is not None and value > max_tokens_limit:
            raise InvalidRequest(f"{field} must be at most {max_tokens_limit}.", param=field)
    return chat_request


@endpoints.post("/v1/chat/completions", openapi_extra=REQUEST_SCHEMA, response_model=None)
async def chat_completions(
    request: Request, client_key_id: str | None = Depends(require_client)
) -> JSONResponse | StreamingResponse:
    settings = request.app.state.settings
    chat_request = parse_chat_request(await read_json_body(request), settings.server.max_tokens_limit)
    request.app.state.key_policies.check_route(client_key_id, chat_request.model)
    service: ChatService = request.app.state.chat_service
    if chat_request.stream:
        started = await service.start_stream(chat_request, client_key_id)
        return StreamingResponse(
            started.events,
            media_type="text/event-stream",
            headers={**started.headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
        )
    served = await service.complete(chat_request, client_key_id)
    return JSONResponse(served.body, headers=served.headers)
