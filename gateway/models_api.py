"""``GET /v1/models``: the routes, as OpenAI model objects."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from gateway.auth import require_client
from gateway.route_table import RouteTable

endpoints = APIRouter()


def model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "distillgate"}


@endpoints.get("/v1/models")
async def list_models(request: Request, client_key_id: str | None = Depends(require_client)) -> dict[str, Any]:
    routes: RouteTable = request.app.state.routes
    created = request.app.state.started_at
    allowed = request.app.state.key_policies.route_allowed
    return {"object": "list", "data": [model_object(state.config.name, created) for state in routes
                                       if allowed(client_key_id, state.config.name)]}


@endpoints.get("/v1/models/{model}")
async def get_model(model: str, request: Request, client_key_id: str | None = Depends(require_client)) -> dict[str, Any]:
    routes: RouteTable = request.app.state.routes
    request.app.state.key_policies.check_route(client_key_id, model)
    return model_object(routes.get(model).config.name, request.app.state.started_at)
