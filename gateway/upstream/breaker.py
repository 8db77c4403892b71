"""A circuit breaker in front of the student server.

States::

    closed ──N consecutive server faults──► open ──probe passes──► half_open
      ▲                                      ▲                        │
      └──────── the trial request succeeds ──┼────────────────────────┘
                                             └── the trial fails ─────┘

* closed: requests go to the student; server faults (5xx, timeout, connection error, a 200
  with a malformed body) are counted, a success resets the count. A 4xx is the request's
  fault (a prompt too long, an adapter just unloaded) and the gateway's own full connection
  pool is not the server's: neither counts, so no client can open the breaker for everyone.
* open: requests skip the student and go straight to the teacher (no client waits for a
  student timeout). A background probe checks the server (``/health`` plus a one-token chat
  against the base model) every ``probe_interval_s``.
* half_open: the probe passed; one trial request goes to the student (the others keep going
  to the teacher), as Envoy and resilience4j admit a bounded number of trial calls. Its
  failure re-opens the breaker, its success closes it. A trial that never reports back
  (its client went away) frees the slot after ``trial_timeout_s``.

One breaker guards each student server (every route's adapter lives in each), so a dead
server is detected after N failures whichever routes they came from; the pool
(gateway/upstream/pool.py) sends the others' traffic on. Before an open breaker goes
half-open, ``on_recover`` (the pool's) loads the live adapters into the server: a server
that restarted has forgotten them, and must have them before it takes traffic again.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from core.config import BreakerConfig
from core.tasks import cancel_and_wait
from core.upstream import StudentBackend, UpstreamFailure

logger = logging.getLogger(__name__)


class BreakerState(enum.IntEnum):
    """Values double as the metrics gauge (0 closed, 1 half_open, 2 open)."""

    closed = 0
    half_open = 1
    open = 2


class StudentBreaker:
    def __init__(self, student: StudentBackend, config: BreakerConfig, probe_model: str, *, server: str = "student",
                 on_recover: Callable[[], Awaitable[bool]] | None = None) -> None:
        self.student = student
        self.config = config
        self.probe_model = probe_model
        self.server = server  # the server's URL, for logs and metrics
        self.on_recover = on_recover
        self.state = BreakerState.closed
        self.consecutive_failures = 0
        self.opened_total = 0
        self.last_failure: str | None = None
        self.opened_at: float | None = None
        self.ignored_failures = 0  # client-caused failures (4xx) and the gateway's own limits
        self._trial_since: float | None = None  # when the half-open trial request was admitted
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- the request path -------------------------------------------------------------------
    def can_admit(self) -> bool:
        """Whether ``allow()`` would admit a request now (it takes nothing)."""
        if not self.config.enabled or self.state is BreakerState.closed:
            return True
        if self.state is BreakerState.open:
            return False
        return self._trial_since is None or time.monotonic() - self._trial_since >= self.config.trial_timeout_s

    def allow(self) -> bool:
        """Whether a request may try the student now (in half-open: the one trial, taken)."""
        if not self.can_admit():
            return False
        if self.config.enabled and self.state is BreakerState.half_open:
            self._trial_since = time.monotonic()
        return True

    def record_success(self) -> None:
        if self.state is not BreakerState.closed:
            logger.info("student breaker closed", extra={"server": self.server, "after_s": self._open_for()})
        self.state = BreakerState.closed
        self.consecutive_failures = 0
        self._trial_since = None

    def record_failure(self, reason: str, *, server_fault: bool = True) -> None:
        """A student request failed; only a server fault counts towards opening."""
        if not server_fault:
            self.ignored_failures += 1
            self._trial_since = None  # the trial proved nothing either way: admit another
            return
        self.consecutive_failures += 1
        self.last_failure = reason[:300]
        self._trial_since = None
        if not self.config.enabled or self.state is BreakerState.open:
            return
        if self.state is BreakerState.half_open or self.consecutive_failures >= self.config.failure_threshold:
            self._open()

    def force_open(self, reason: str) -> None:
        """Take the server out of service until its probe passes and ``on_recover`` succeeds
        (it answers, but without the live adapters: it restarted, or a restore failed)."""
        self.last_failure = reason[:300]
        if self.state is not BreakerState.open:
            self._open()

    def _open(self) -> None:
        self.state = BreakerState.open
        self.opened_total += 1
        self.opened_at = time.monotonic()
        logger.warning("student breaker open: no requests to this server", extra={
            "server": self.server, "failures": self.consecutive_failures, "reason": self.last_failure})
        self._wake.set()

    def _open_for(self) -> float | None:
        return round(time.monotonic() - self.opened_at, 3) if self.opened_at is not None else None

    def describe(self) -> dict[str, Any]:
        return {"url": self.server, "state": self.state.name, "consecutive_failures": self.consecutive_failures,
                "opened_total": self.opened_total, "ignored_failures": self.ignored_failures,
                "last_failure": self.last_failure}

    # -- the background probe ---------------------------------------------------------------
    def start(self) -> None:
        if self.config.enabled:
            self._task = asyncio.create_task(self._probe_loop(), name="student-breaker-probe")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _probe_loop(self) -> None:
        while True:
            await self._wake.wait()
            while self.state is BreakerState.open:
                await asyncio.sleep(self.config.probe_interval_s)
                if await self.probe() and await self._recovered():
                    self.state = BreakerState.half_open
                    self._trial_since = None
                    logger.info("student probe passed: breaker half-open",
                                extra={"server": self.server, "open_s": self._open_for()})
            self._wake.clear()

    async def _recovered(self) -> bool:
        """The live adapters are (again) in the server; it stays open until they are."""
        return self.on_recover is None or await self.on_recover()

    async def probe(self) -> bool:
        """``/health`` and a one-token chat, each bounded by the probe timeout."""
        timeout = self.config.probe_timeout_s
        try:
            if not await asyncio.wait_for(self.student.healthy(), timeout):
                return False
            body = {"messages": [{"role": "user", "content": "ping"}], "max_tokens": 1, "temperature": 0}
            await asyncio.wait_for(self.student.chat(self.probe_model, body, timeout), timeout + 1)
        except (UpstreamFailure, TimeoutError) as failure:
            logger.info("student probe failed", extra={"server": self.server, "error": repr(failure)[:200]})
            return False
        return True
