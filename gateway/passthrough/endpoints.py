"""HTTP routes for legacy completions and embeddings, forwarded to the route's provider."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.auth import require_client
from gateway.chat.endpoints import read_json_body
from gateway.error_handlers import validation_error
from gateway.errors import InvalidRequest
from gateway.passthrough.service import PassthroughService

endpoints = APIRouter()


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    stream: bool = Field(False, description="streaming is not supported on this endpoint")


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: str = Field("float", pattern="^(float|base64)$")
    dimensions: int | None = Field(None, ge=1)


def _parse(model: type[BaseModel], payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise InvalidRequest("Request body must be a JSON object.")
    try:
        model.model_validate(payload)
    except ValidationError as error:
        raise validation_error(list(error.errors())) from None
    return payload


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


@endpoints.post("/v1/completions", openapi_extra=_schema(CompletionRequest), response_model=None)
async def completions(request: Request, client_key_id: str | None = Depends(require_client)) -> JSONResponse:
    body = _parse(CompletionRequest, await read_json_body(request))
    limit = request.app.state.settings.server.max_tokens_limit
    if body.get("stream"):
        raise InvalidRequest("stream is not supported on /v1/completions.", param="stream")
    if (body.get("max_tokens") or 0) > limit:
        raise InvalidRequest(f"max_tokens must be at most {limit}.", param="max_tokens")
    request.app.state.key_policies.check_route(client_key_id, body["model"])
    service: PassthroughService = request.app.state.passthrough_service
    served = await service.complete(body, client_key_id)
    return JSONResponse(served.body, headers=served.headers)


@endpoints.post("/v1/embeddings", openapi_extra=_schema(EmbeddingRequest), response_model=None)
async def embeddings(request: Request, client_key_id: str | None = Depends(require_client)) -> JSONResponse:
    body = _parse(EmbeddingRequest, await read_json_body(request))
    request.app.state.key_policies.check_route(client_key_id, body["model"])
    service: PassthroughService = request.app.state.passthrough_service
    served = await service.embed(body, client_key_id)
    return JSONResponse(served.body, headers=served.headers)
