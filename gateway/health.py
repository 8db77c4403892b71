"""``/healthz`` (the process is up) and ``/readyz`` (store writable, writer alive, upstreams).

``/readyz`` is open (orchestrators probe it without credentials), so it says what is up and
what is not, and counts; error text (paths, SQL errors, upstream messages) is shown only to a
caller with the admin token, as Envoy keeps its admin detail behind the admin listener.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from core.store import STORE_ERRORS
from gateway.auth import require_admin
from gateway.errors import GatewayError

endpoints = APIRouter()

# The write check runs on its own connection with a short busy timeout; readiness answers
# sooner than the store's busy timeout and never holds the store's lock meanwhile.
STORE_CHECK_TIMEOUT_S = 2.0
# Error text, and the student servers' addresses (the internal topology), are admin detail.
DETAIL_KEYS = ("error", "last_failure", "last_crash", "last_exit", "reloaded", "url")


@endpoints.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _store_check(request: Request) -> dict[str, Any]:
    writer = request.app.state.writer
    check: dict[str, Any] = {"pending_rows": writer.pending, "writer_alive": writer.alive,
                             "writer_restarts": writer.restarts, "dead_letter_rows": writer.dead_letter_rows,
                             "last_crash": writer.last_crash}
    spool = writer.spool
    if spool is not None:
        check["spool"] = {"pending_rows": spool.pending, "error": spool.last_error}
    try:
        await asyncio.wait_for(asyncio.to_thread(request.app.state.store.check_writable), STORE_CHECK_TIMEOUT_S)
    except STORE_ERRORS as error:
        return {**check, "ok": False, "error": f"{type(error).__name__}: {error}"}
    except TimeoutError:
        return {**check, "ok": False, "error": "the store did not take a write in time (locked?)"}
    ok = writer.alive and writer.healthy and (spool is None or spool.last_error is None)
    return {**check, "ok": ok, "error": writer.last_error or (spool.last_error if spool else None)}


def _student_check(request: Request, reachable: bool) -> dict[str, Any]:
    state = request.app.state
    pool = state.student.describe()
    check: dict[str, Any] = {"ok": reachable, "breaker": {k: v for k, v in pool.items() if k != "servers"},
                             "servers": pool["servers"]}
    supervisor = getattr(state, "vllm_supervisor", None)
    if supervisor is not None:
        check["server"] = supervisor.describe()
    return check


def _is_admin(request: Request) -> bool:
    try:
        require_admin(request)
    except GatewayError:
        return False
    return True


def _without_detail(value: Any) -> Any:
    """The checks without error text: what a caller without the admin token sees."""
    if isinstance(value, dict):
        return {key: _without_detail(item) for key, item in value.items() if key not in DETAIL_KEYS}
    if isinstance(value, list):
        return [_without_detail(item) for item in value]
    return value


@endpoints.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    teachers = state.chat_service.teachers
    student_ok, *teacher_oks = await asyncio.gather(
        state.student.healthy(), *(teacher.healthy() for teacher in teachers.values())
    )
    checks = {
        "store": await _store_check(request),
        "student": _student_check(request, student_ok),
        "teachers": {name: {"ok": ok} for name, ok in zip(teachers, teacher_oks, strict=True)},
    }
    # The student is optional for readiness: without it every request goes to the teacher.
    ready = checks["store"]["ok"] and all(ok for ok in teacher_oks)
    body = {"ready": ready, "checks": checks if _is_admin(request) else _without_detail(checks)}
    return JSONResponse(body, status_code=200 if ready else 503)
