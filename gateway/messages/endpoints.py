"""HTTP route for Anthropic's Messages API: read, validate, translate to chat, serve, translate
back. Errors on this path answer in Anthropic's envelope (registered in gateway/app.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from gateway.auth import require_client
from gateway.chat.endpoints import parse_chat_request, read_json_body
from gateway.chat.service import ChatService
from gateway.error_handlers import validation_error
from gateway.errors import InvalidRequest
from gateway.messages.protocol import MessagesRequest
from gateway.messages.shapes import MessagesStreamFormat, message_body

endpoints = APIRouter()

REQUEST_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": MessagesRequest.model_json_schema()}},
    }
}
STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def parse_messages_request(payload: Any, max_tokens_limit: int) -> MessagesRequest:
    if not isinstance(payload, dict):
        raise InvalidRequest("Request body must be a JSON object.")
    try:
        request = MessagesRequest.model_validate(payload)
    except ValidationError as error:
        raise validation_error(list(error.errors())) from None
    if request.max_tokens > max_tokens_limit:
        raise InvalidRequest(f"max_tokens must be at most {max_tokens_limit}.", param="max_tokens")
    return request


@endpoints.post("/v1/messages", openapi_extra=REQUEST_SCHEMA, response_model=None)
async def create_message(
    request: Request, client_key_id: str | None = Depends(require_client)
) -> JSONResponse | StreamingResponse:
    settings = request.app.state.settings
    messages_request = parse_messages_request(await read_json_body(request), settings.server.max_tokens_limit)
    chat_request = parse_chat_request(messages_request.chat_payload(), settings.server.max_tokens_limit)
    request.app.state.key_policies.check_route(client_key_id, chat_request.model)
    service: ChatService = request.app.state.chat_service
    if chat_request.stream:
        started = await service.start_stream(chat_request, client_key_id, MessagesStreamFormat(chat_request.model))
        return StreamingResponse(started.events, media_type="text/event-stream",
                                 headers={**started.headers, **STREAM_HEADERS})
    served = await service.complete(chat_request, client_key_id)
    return JSONResponse(message_body(served.body, chat_request.model), headers=served.headers)

