"""HTTP route for the Responses API: read, validate, translate to chat, serve, translate back."""

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
from gateway.responses.protocol import ResponsesRequest
from gateway.responses.shapes import ResponsesStreamFormat, response_body

endpoints = APIRouter()

REQUEST_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ResponsesRequest.model_json_schema()}},
    }
}
STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def parse_responses_request(payload: Any, max_tokens_limit: int) -> ResponsesRequest:
    if not isinstance(payload, dict):
        raise InvalidRequest("Request body must be a JSON object.")
    try:
        request = ResponsesRequest.model_validate(payload)
    except ValidationError as error:
        raise validation_error(list(error.errors())) from None
    if request.max_output_tokens is not None and request.max_output_tokens > max_tokens_limit:
        raise InvalidRequest(f"max_output_tokens must be at most {max_tokens_limit}.", param="max_output_tokens")
    return request


@endpoints.post("/v1/responses", openapi_extra=REQUEST_SCHEMA, response_model=None)
async def create_response(
    request: Request, client_key_id: str | None = Depends(require_client)
) -> JSONResponse | StreamingResponse:
    settings = request.app.state.settings
    responses_request = parse_responses_request(await read_json_body(request), settings.server.max_tokens_limit)
    chat_request = parse_chat_request(responses_request.chat_payload(), settings.server.max_tokens_limit)
    request.app.state.key_policies.check_route(client_key_id, chat_request.model)
    service: ChatService = request.app.state.chat_service
    if chat_request.stream:
        started = await service.start_stream(chat_request, client_key_id, ResponsesStreamFormat(responses_request))
        return StreamingResponse(started.events, media_type="text/event-stream",
                                 headers={**started.headers, **STREAM_HEADERS})
    served = await service.complete(chat_request, client_key_id)
    return JSONResponse(response_body(served.body, responses_request), headers=served.headers)
