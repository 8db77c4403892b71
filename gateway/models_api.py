"""``GET /v1/models``: the routes, as OpenAI model objects."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from gateway.auth import require_client
from gateway.routes import RouteTable

router = APIRouter()


def model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "distillgate"}


@router.get("/v1/models", dependencies=[Depends(require_client)])
async def list_models(request: Request) -> dict[str, Any]:
    routes: RouteTable = request.app.state.routes
    created = request.app.state.started_at
    return {"object": "list", "data": [model_object(state.config.name, created) for state in routes]}


@router.get("/v1/models/{model}", dependencies=[Depends(require_client)])
async def get_model(model: str, request: Request) -> dict[str, Any]:
    routes: RouteTable = request.app.state.routes
    return model_object(routes.get(model).config.name, request.app.state.started_at)
