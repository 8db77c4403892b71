"""``/healthz`` (the process is up) and ``/readyz`` (store writable, upstreams reachable)."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _store_check(request: Request) -> dict[str, Any]:
    writer = request.app.state.writer
    try:
        await asyncio.to_thread(request.app.state.store.check_writable)
    except sqlite3.Error as error:
        return {"ok": False, "error": str(error), "pending_rows": writer.pending}
    return {"ok": writer.healthy, "error": writer.last_error, "pending_rows": writer.pending}


@router.get("/readyz")
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
