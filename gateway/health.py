"""``/healthz`` (the process is up) and ``/readyz`` (store writable, upstreams reachable)."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

endpoints = APIRouter()


@endpoints.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


# A locked database makes the write check wait for the store's busy timeout; readiness
# answers sooner than that.
STORE_CHECK_TIMEOUT_S = 2.0


async def _store_check(request: Request) -> dict[str, Any]:
    writer = request.app.state.writer
    check: dict[str, Any] = {"pending_rows": writer.pending}
    spool = writer.spool
    if spool is not None:
        check["spool"] = {"pending_rows": spool.pending, "error": spool.last_error}
    try:
        await asyncio.wait_for(asyncio.to_thread(request.app.state.store.check_writable), STORE_CHECK_TIMEOUT_S)
    except sqlite3.Error as error:
        return {**check, "ok": False, "error": f"{type(error).__name__}: {error}"}
    except TimeoutError:
        return {**check, "ok": False, "error": "the store did not take a write in time (locked?)"}
    ok = writer.healthy and (spool is None or spool.last_error is None)
    return {**check, "ok": ok, "error": writer.last_error or (spool.last_error if spool else None)}


@endpoints.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    teachers = state.chat_service.teachers
    student_ok, *teacher_oks = await asyncio.gather(
        state.student.healthy(), *(teacher.healthy() for teacher in teachers.values())
    )
    checks = {
        "store": await _store_check(request),
        "student": {"ok": student_ok, "breaker": state.breaker.describe()},
        "teachers": {name: {"ok": ok} for name, ok in zip(teachers, teacher_oks, strict=True)},
    }
    # The student is optional for readiness: without it every request goes to the teacher.
    ready = checks["store"]["ok"] and all(ok for ok in teacher_oks)
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)
