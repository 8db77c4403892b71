"""HTTP route for feedback: read, bound, parse, validate, hand to the service."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from gateway.auth import require_client
from gateway.chat.endpoints import read_json_body
from gateway.error_handlers import validation_error
from gateway.errors import InvalidRequest
from gateway.feedback.protocol import FeedbackRequest
from gateway.feedback.service import FeedbackService

endpoints = APIRouter()

REQUEST_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": FeedbackRequest.model_json_schema()}},
    }
}


def parse_feedback(payload: Any) -> FeedbackRequest:
    if not isinstance(payload, dict):
        raise InvalidRequest("Request body must be a JSON object.")
    try:
        return FeedbackRequest.model_validate(payload)
    except ValidationError as error:
        raise validation_error(list(error.errors())) from None


@endpoints.post("/v1/feedback", openapi_extra=REQUEST_SCHEMA, response_model=None)
async def create_feedback(request: Request, client_key_id: str | None = Depends(require_client)) -> JSONResponse:
    feedback = parse_feedback(await read_json_body(request))
    service: FeedbackService = request.app.state.feedback
    return JSONResponse(await service.submit(feedback, client_key_id))
