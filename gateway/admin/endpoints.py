"""Admin API: read and tune routes live, list, promote and roll back student versions."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import APIRouter, Depends, Request

from gateway.auth import require_admin
from gateway.chat.endpoints import read_json_body
from gateway.errors import Conflict, InvalidRequest, NotFound, Unavailable
from gateway.route_table import RouteTable
from gateway.training.swap import SwapError

logger = logging.getLogger(__name__)

endpoints = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


def _routes(request: Request) -> RouteTable:
    return request.app.state.routes


def _version_view(row: dict[str, Any]) -> dict[str, Any]:
    view = dict(row)
    view["metrics"] = json.loads(view.pop("metrics_json") or "{}")
    return view


@endpoints.get("/routes")
async def list_routes(request: Request) -> dict[str, Any]:
    canaries = request.app.state.training.canaries
    return {"object": "list", "data": [{**state.describe(), "rollout": canaries.status(state.config.name)}
                                       for state in _routes(request)]}


@endpoints.get("/routes/{route}")
async def get_route(route: str, request: Request) -> dict[str, Any]:
    """The route's live settings, and its drift (recent traffic vs the live version's training set)."""
    described = _routes(request).get(route).describe()
    training = request.app.state.training
    return {**described, "drift": training.drift.status(route), "rollout": training.canaries.status(route)}


@endpoints.patch("/routes/{route}")
async def patch_route(route: str, request: Request, actor: str = Depends(require_admin)) -> dict[str, Any]:
    changes = await read_json_body(request)
    if not isinstance(changes, dict):
        raise InvalidRequest("Request body must be a JSON object of settings to change.")
    return _routes(request).update(route, changes, actor).describe()


@endpoints.delete("/routes/{route}/overrides/{field}")
async def clear_route_override(route: str, field: str, request: Request,
                               actor: str = Depends(require_admin)) -> dict[str, Any]:
    """Clear one override: the config's value applies again (audited)."""
    return _routes(request).clear(route, [field], actor).describe()


@endpoints.delete("/routes/{route}/overrides")
async def clear_route_overrides(route: str, request: Request, actor: str = Depends(require_admin)) -> dict[str, Any]:
    """Clear every override of the route, ignored ones included."""
    state = _routes(request).get(route)
    fields = sorted({*state.overrides, *state.ignored_overrides})
    return _routes(request).clear(route, fields, actor).describe()


@endpoints.get("/routes/{route}/audit")
async def route_audit(route: str, request: Request) -> dict[str, Any]:
    _routes(request).get(route)
    return {"object": "list", "data": request.app.state.store.route_audit(route)}


@endpoints.get("/routes/{route}/versions")
async def route_versions(route: str, request: Request) -> dict[str, Any]:
    _routes(request).get(route)
    return {"object": "list", "data": [_version_view(row) for row in request.app.state.store.versions(route)]}


def _swapper(request: Request) -> Any:
    swapper = getattr(request.app.state, "swapper", None)
    if swapper is None:
        raise Unavailable("Hot swap is not available: the student server is not configured.")
    return swapper


@endpoints.post("/routes/{route}/promote")
async def promote(route: str, request: Request, actor: str = Depends(require_admin)) -> dict[str, Any]:
    _routes(request).get(route)
    payload = await read_json_body(request)
    version = payload.get("version") if isinstance(payload, dict) else None
    if not isinstance(version, str) or not version:
        raise InvalidRequest("Send {\"version\": \"<version>\"} to promote.", param="version")
    known = {row["version"] for row in request.app.state.store.versions(route)}
    if version not in known:
        raise NotFound(f"Route {route!r} has no version {version!r}.", param="version")
    force = payload.get("force", False)
    if not isinstance(force, bool):  # bool("false") is True: only a JSON boolean means yes or no
        raise InvalidRequest("force must be a JSON boolean (true or false).", param="force")
    action = "promote --force" if force else "promote"
    previous = _live_version(request, route)
    canaries = request.app.state.training.canaries
    run = canaries.active(route)
    try:
        if run is not None and run.version == version:
            ended = await canaries.promote(route, actor)  # the operator ends the canary: it goes live
            if ended["action"] != "promote":
                raise SwapError(ended.get("error") or "the canary could not be promoted")
            _audit(request, route, actor, action, previous, {"version": version, "canary": True})
            return _routes(request).get(route).describe()
        if run is not None:
            await canaries.abandon(route, actor)  # another version goes live: the canary ends unjudged
        await _swapper(request).promote(route, version, force=force)
    except SwapError as error:
        _audit(request, route, actor, action, previous, {"version": version, "refused": str(error)})
        raise Conflict(str(error), param="version") from error
    _audit(request, route, actor, action, previous, {"version": version})
    return _routes(request).get(route).describe()


@endpoints.post("/routes/{route}/canary")
async def start_canary(route: str, request: Request, actor: str = Depends(require_admin)) -> dict[str, Any]:
    """Start a canary of a candidate by hand (the route's ``rollout`` settings apply; a
    route without ``canary_share`` takes 0.1)."""
    state = _routes(request).get(route)
    payload = await read_json_body(request)
    version = payload.get("version") if isinstance(payload, dict) else None
    if not isinstance(version, str) or not version:
        raise InvalidRequest("Send {\"version\": \"<version>\"} to start a canary.", param="version")
    if version not in {row["version"] for row in request.app.state.store.versions(route)}:
        raise NotFound(f"Route {route!r} has no version {version!r}.", param="version")
    _swapper(request)
    try:
        await request.app.state.training.canaries.begin(route, version, actor)
    except SwapError as error:
        _audit(request, route, actor, "canary_start", _live_version(request, route),
               {"version": version, "refused": str(error)})
        raise Conflict(str(error), param="version") from error
    return state.describe()


@endpoints.post("/routes/{route}/rollback")
async def rollback(route: str, request: Request, actor: str = Depends(require_admin)) -> dict[str, Any]:
    _routes(request).get(route)
    previous = _live_version(request, route)
    canaries = request.app.state.training.canaries
    if canaries.active(route) is not None:
        # During a canary, rolling back means the canary: live keeps serving.
        ended = await canaries.rollback(route, actor)
        _audit(request, route, actor, "rollback", previous, {"version": previous, "canary": ended["version"]})
        return _routes(request).get(route).describe()
    try:
        await _swapper(request).rollback(route)
    except SwapError as error:
        _audit(request, route, actor, "rollback", previous, {"refused": str(error)})
        raise Conflict(str(error)) from error
    _audit(request, route, actor, "rollback", previous, {"version": _live_version(request, route)})
    return _routes(request).get(route).describe()


def _live_version(request: Request, route: str) -> str | None:
    pointer = _routes(request).get(route).student
    return pointer.version if pointer is not None else None


def _audit(request: Request, route: str, actor: str, action: str, old: Any, new: Any) -> None:
    """Promotions and rollbacks, refused ones too, with who asked (``GET .../audit``)."""
    request.app.state.store.record_route_event(route, actor, action, old, new)
    logger.info("route audit", extra={"route": route, "actor": actor, "action": action, "old": old, "new": new})


@endpoints.post("/sessions/revoke")
async def revoke_sessions(request: Request, actor: str = Depends(require_admin)) -> dict[str, Any]:
    """Sign every dashboard session out (e.g. after a shared screen or a lost laptop)."""
    revoked = request.app.state.sessions.revoke_all()
    logger.warning("dashboard sessions revoked", extra={"actor": actor, "revoked": revoked})
    return {"revoked": revoked}
