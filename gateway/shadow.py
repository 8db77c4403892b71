"""Shadow evaluation: the other model answers the same request off the hot path.

A sampled share of student-served requests also goes to the teacher (and, in ``shadow``
mode, every teacher-served request also goes to the student) so agreement per route is
measured on live traffic. A bounded queue and a rate limit keep it from ever delaying a
client: when the queue is full the sample is skipped and counted, never waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.answers import answers_agree
from core.prompting import student_request
from core.store import BatchWriter
from core.upstream import Completion, StudentBackend, TeacherClient, UpstreamFailure
from gateway.chat.record import RequestRecord
from gateway.route_table import RouteState

logger = logging.getLogger(__name__)


@dataclass
class ShadowJob:
    state: RouteState
    record: RequestRecord
    body: dict[str, Any]
    served: Completion


class ShadowRunner:
    def __init__(self, student: StudentBackend, teachers: dict[str, TeacherClient], writer: BatchWriter, *,
                 max_pending: int = 256, workers: int = 4, max_per_second: float = 20.0) -> None:
        self._student = student
        self._teachers = teachers
        self._writer = writer
        self._queue: asyncio.Queue[ShadowJob] = asyncio.Queue(maxsize=max_pending)
        self._workers = workers
        self._min_interval_s = 1.0 / max_per_second
        self._next_start = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        # Called with (record, agree) per finished comparison: the canary's evidence.
        self.observers: list[Callable[[RequestRecord, bool], None]] = []
        self.skipped = 0
        self.completed = 0
        self.failed = 0

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"shadow-{index}") for index in range(self._workers)]

    def submit(self, state: RouteState, record: RequestRecord, body: dict[str, Any], served: Completion) -> None:
        try:
            self._queue.put_nowait(ShadowJob(state, record, body, served))
        except asyncio.QueueFull:
            self.skipped += 1

    async def _pace(self) -> None:
        loop = asyncio.get_running_loop()
        wait = self._next_start - loop.time()
        self._next_start = max(loop.time(), self._next_start) + self._min_interval_s
        if wait > 0:
            await asyncio.sleep(wait)

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                await self._pace()
                await self._run(job)
            except UpstreamFailure as failure:
                self.failed += 1
                logger.info("shadow call failed", extra={"route": job.record.route,
                                                         "error": job.record.redact(str(failure))})
            except Exception:  # the worker loop is an outer boundary: log and keep serving
                self.failed += 1
                logger.exception("shadow job crashed", extra={"route": job.record.route})
            finally:
                self._queue.task_done()

    async def _run(self, job: ShadowJob) -> None:
        config = job.state.config
        if job.record.target == "student":
            teacher_completion = await self._teachers[config.name].chat(job.body)
            student_answer, teacher_answer = job.served.text, teacher_completion.text
            teacher_body, cost = teacher_completion.body, teacher_completion.cost_usd
            version = job.record.student_version  # the version that answered: live or the canary
        else:
            pointer = job.state.student
            if pointer is None:
                return
            version = pointer.version
            student_body = student_request(config.student.system_prompt, job.body)
            student_completion = await self._student.chat(pointer.adapter_name, student_body, config.student.timeout_s)
            student_answer, teacher_answer = student_completion.text, job.served.text
            teacher_body, cost = job.served.body, 0.0
        self.completed += 1
        agree = answers_agree(student_answer, teacher_answer)
        for observer in self.observers:
            observer(job.record, agree)
        redact = job.record.redact  # the route's redaction, as for the request row
        await self._writer.log({
            "request_id": job.record.id,
            "created_at": time.time(),
            "route": config.name,
            "student_version": version,
            "router_score": job.record.router_score,
            "student_answer": redact(student_answer),
            "teacher_answer": redact(teacher_answer),
            "teacher_response_json": json.dumps(redact(teacher_body), ensure_ascii=False, default=str),
            "agree": int(agree),
            "served_by": job.record.target,
            "cost_usd": cost,
        })

    async def close(self, timeout_s: float = 10.0) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_s)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
