"""A circuit breaker in front of the student server.

States::

    closed ──N consecutive failures──► open ──probe passes──► half_open
      ▲                                  ▲                       │
      └────────── a request succeeds ────┼───────────────────────┘
                                         └── a request fails ────┘

* closed: requests go to the student; failures (error, timeout, garbage such as a 200 with
  a malformed body) are counted, a success resets the count.
* open: requests skip the student and go straight to the teacher (no client waits for a
  student timeout). A background probe checks the server (``/health`` plus a one-token chat
  against the base model) every ``probe_interval_s``.
* half_open: the probe passed; real requests go to the student again, the first failure
  re-opens the breaker, the first success closes it.

One breaker guards the one student server (every route's adapter lives in it), so a dead
server is detected after N failures whichever routes they came from.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from typing import Any

from core.config import BreakerConfig
from core.upstream import StudentBackend, UpstreamFailure

logger = logging.getLogger(__name__)


class BreakerState(enum.IntEnum):
    """Values double as the metrics gauge (0 closed, 1 half_open, 2 open)."""

    closed = 0
    half_open = 1
    open = 2


class StudentBreaker:
    def __init__(self, student: StudentBackend, config: BreakerConfig, probe_model: str) -> None:
        self.student = student
        self.config = config
        self.probe_model = probe_model
        self.state = BreakerState.closed
        self.consecutive_failures = 0
        self.opened_total = 0
        self.last_failure: str | None = None
        self.opened_at: float | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- the request path -------------------------------------------------------------------
    def allow(self) -> bool:
        """Whether a request may try the student now."""
        return not self.config.enabled or self.state is not BreakerState.open

    def record_success(self) -> None:
        if self.state is not BreakerState.closed:
            logger.info("student breaker closed", extra={"after_s": self._open_for()})
        self.state = BreakerState.closed
        self.consecutive_failures = 0

    def record_failure(self, reason: str) -> None:
        self.consecutive_failures += 1
        self.last_failure = reason[:300]
        if not self.config.enabled or self.state is BreakerState.open:
            return
        if self.state is BreakerState.half_open or self.consecutive_failures >= self.config.failure_threshold:
            self._open()

    def _open(self) -> None:
        self.state = BreakerState.open
        self.opened_total += 1
        self.opened_at = time.monotonic()
        logger.warning("student breaker open: serving every route from the teacher",
                       extra={"failures": self.consecutive_failures, "reason": self.last_failure})
        self._wake.set()

    def _open_for(self) -> float | None:
        return round(time.monotonic() - self.opened_at, 3) if self.opened_at is not None else None

    def describe(self) -> dict[str, Any]:
        return {"state": self.state.name, "consecutive_failures": self.consecutive_failures,
                "opened_total": self.opened_total, "last_failure": self.last_failure}

    # -- the background probe ---------------------------------------------------------------
    def start(self) -> None:
        if self.config.enabled:
            self._task = asyncio.create_task(self._probe_loop(), name="student-breaker-probe")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _probe_loop(self) -> None:
        while True:
            await self._wake.wait()
            while self.state is BreakerState.open:
                await asyncio.sleep(self.config.probe_interval_s)
                if await self.probe():
                    self.state = BreakerState.half_open
                    logger.info("student probe passed: breaker half-open", extra={"open_s": self._open_for()})
            self._wake.clear()

    async def probe(self) -> bool:
        """``/health`` and a one-token chat, each bounded by the probe timeout."""
        timeout = self.config.probe_timeout_s
        try:
            if not await asyncio.wait_for(self.student.healthy(), timeout):
                return False
            body = {"messages": [{"role": "user", "content": "ping"}], "max_tokens": 1, "temperature": 0}
            await asyncio.wait_for(self.student.chat(self.probe_model, body, timeout), timeout + 1)
        except (UpstreamFailure, TimeoutError) as failure:
            logger.info("student probe failed", extra={"error": repr(failure)[:200]})
            return False
        return True
