"""``/dashboard``: server-rendered pages for operators (admin token).

A browser signs in with the login form only (``POST /dashboard/login``: a token in a URL
ends up in history, proxies' logs and Referer headers), rate-limited per address, and gets
a server-side session cookie (gateway/dashboard/sessions.py); the page's buttons then call
the admin API with it. Sign-out ends the session on the server.
Charts are drawn by uPlot, vendored under ``static/`` (machines here are offline: no CDN).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import math
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from core.store.reporting import parse_since
from gateway.auth import ADMIN_COOKIE, constant_time_in, key_id, require_admin
from gateway.dashboard import views
from gateway.errors import AuthenticationFailed, InvalidRequest, NotFound, PermissionDenied

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
STATIC_TYPES = {
    "uPlot.iife.min.js": "text/javascript",
    "uPlot.min.css": "text/css",
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}
endpoints = APIRouter(prefix="/dashboard", include_in_schema=False)


# -- rendering -------------------------------------------------------------------------------
def _money(value: float | None) -> str:
    if value is None:
        return "—"
    sign = "-" if value < 0 else ""
    value = abs(value)
    return f"{sign}${value:,.2f}" if value >= 100 else f"{sign}${value:,.4f}" if value >= 0.01 else f"{sign}${value:.6f}"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _when(value: float | None) -> str:
    if not value:
        return "—"
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


@functools.cache
def _templates() -> jinja2.Environment:
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                     autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined)
    environment.filters.update(money=_money, percent=_percent, ms=_ms, when=_when)
    return environment


def _page(name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    html = _templates().get_template(name).render(**context)
    # The page embeds live figures; no cache, and no framing by other sites.
    headers = {"cache-control": "no-store", "x-frame-options": "DENY", "referrer-policy": "no-referrer"}
    return HTMLResponse(html, status_code=status_code, headers=headers)


# -- session ---------------------------------------------------------------------------------
def _signed_in(request: Request) -> bool:
    """True with a valid bearer or session cookie; raises PermissionDenied when the admin
    API is disabled (no admin token configured)."""
    try:
        require_admin(request)
    except AuthenticationFailed:
        return False
    return True


def _login_page(request: Request, message: str | None = None, status_code: int = 401,
                next_path: str | None = None) -> HTMLResponse:
    target = next_path or (request.url.path if request.url.path.startswith("/dashboard") else "/dashboard")
    return _page("login.html", status_code=status_code, message=message, next=target)


def _sign_in(request: Request, token: str, next_path: str) -> Response:
    state = request.app.state
    admin_token: str | None = state.admin_token
    if admin_token is None:
        raise PermissionDenied("The dashboard is disabled: set the admin token environment variable.")
    client = request.client.host if request.client else "unknown"
    wait_s = state.sign_in_limiter.wait_s(client)
    if wait_s > 0:
        logger.warning("dashboard sign-in rate limited", extra={"client": client, "retry_after_s": wait_s})
        page = _login_page(request, "Too many sign-in attempts; wait a minute.", 429, next_path)
        page.headers["retry-after"] = str(math.ceil(wait_s))
        return page
    if not constant_time_in(token, [admin_token]):
        logger.warning("dashboard sign-in refused", extra={"client": client})
        return _login_page(request, "That is not the admin token.", next_path=next_path)
    # Only paths under /dashboard: a sign-in link must not redirect anywhere else.
    safe_next = next_path if next_path.startswith("/dashboard") and "//" not in next_path else "/dashboard"
    response = RedirectResponse(safe_next, status_code=303)
    actor = f"dashboard:{key_id(admin_token)}"
    # No max-age: a browser-session cookie; the server decides when the session ends.
    response.set_cookie(ADMIN_COOKIE, state.sessions.create(actor), path="/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    logger.info("dashboard signed in", extra={"admin": key_id(admin_token), "client": client})
    return response


def _since(request: Request) -> str:
    since = request.query_params.get("since", views.DEFAULT_WINDOW)
    try:
        parse_since(since)
    except ValueError as error:
        raise InvalidRequest(str(error), param="since") from None
    return since


# -- pages -----------------------------------------------------------------------------------
@endpoints.get("")
async def index(request: Request) -> Response:
    if not _signed_in(request):
        return _login_page(request)
    state = request.app.state
    context = await asyncio.to_thread(views.overview, state.store, state.routes, _since(request),
                                      state.key_names, state.budgets.snapshot())
    return _page("index.html", **context)


@endpoints.post("/login")
async def login(request: Request) -> Response:
    form = parse_qs((await request.body()).decode("utf-8", errors="replace"))
    return _sign_in(request, form.get("token", [""])[0], form.get("next", ["/dashboard"])[0])


@endpoints.post("/logout")
async def logout(request: Request) -> Response:
    cookie = request.cookies.get(ADMIN_COOKIE)
    if cookie and request.app.state.sessions.revoke(cookie):
        logger.info("dashboard signed out")
    response = RedirectResponse("/dashboard", status_code=303)
    response.delete_cookie(ADMIN_COOKIE, path="/")
    return response


@endpoints.get("/routes/{route}")
async def route_page(route: str, request: Request) -> Response:
    if not _signed_in(request):
        return _login_page(request)
    state = request.app.state
    route_state = state.routes.get(route)
    context = await asyncio.to_thread(views.route_page, state.store, route_state, _since(request), state.training.drift)
    return _page("route.html", **context, rollout=state.training.canaries.status(route))


@endpoints.get("/static/{name}")
async def static_file(name: str) -> FileResponse:
    media_type = STATIC_TYPES.get(name)
    if media_type is None:
        raise NotFound(f"No dashboard file {name!r}.")
    return FileResponse(HERE / "static" / name, media_type=media_type, headers={"cache-control": "max-age=3600"})
