"""Keep the student's vLLM server running: restart it with backoff, then reload the adapters.

vLLM forgets runtime-loaded LoRA adapters when it restarts, so once a restarted server is
ready (``/health`` and the base model in ``/v1/models``) the live adapters are loaded again
(``Swapper.restore_live``, which also re-points the routes). Meanwhile requests fall back
to the teacher (the breaker opens on connection errors and its probe closes it).

States (``/readyz`` ``checks.student.server``, metric ``distillgate_student_server_up``)::

    starting ─► warming_up ─► reloading ─(adapters back)─► ready ─(exits)─► down ─► backoff ─► starting

The backoff doubles from ``backoff_initial_s`` to ``backoff_max_s`` and resets once a
server stayed up ``stable_after_s``; the restart count is reported, never capped (like a
Kubernetes restart policy, ``CrashLoopBackOff`` style).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from core.config import SuperviseConfig
from core.tasks import cancel_and_wait
from gateway.vllm_process import VLLMProcess, VLLMStartError

logger = logging.getLogger(__name__)

OnReady = Callable[[], Awaitable[Any]]


class VLLMSupervisor:
    def __init__(self, process: VLLMProcess, config: SuperviseConfig, on_ready: OnReady) -> None:
        self.process = process
        self.config = config
        self.on_ready = on_ready
        self.state = "starting"
        self.restarts = 0
        self.last_exit: str | None = None
        self.ready_since: float | None = None
        self.reloaded: Any = None
        self._failures = 0  # consecutive failed starts or short lives: the backoff exponent
        self._task: asyncio.Task[None] | None = None

    @property
    def up(self) -> bool:
        return self.state == "ready" and self.process.running()

    def describe(self) -> dict[str, Any]:
        return {"state": self.state, "up": self.up, "pid": self.process.server_pid(), "restarts": self.restarts,
                "last_exit": self.last_exit, "reloaded": self.reloaded}

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="vllm-supervisor")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        if not self.process.running():
            await self._restart("not running at gateway start")
        await self._until_ready()
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            if not self.process.running():
                self.state = "down"
                code = self.process.returncode
                logger.error("vLLM exited; restarting it", extra={"returncode": code, "restarts": self.restarts})
                lived = time.monotonic() - (self.ready_since or time.monotonic())
                self._failures = 0 if lived >= self.config.stable_after_s else self._failures + 1
                self.ready_since = None
                # What the dead server forked (vLLM's engine core) is still in its process group.
                await asyncio.to_thread(self.process.stop, 1.0)
                await self._restart(f"exited with status {code}")
                await self._until_ready()

    async def _restart(self, reason: str) -> None:
        self.last_exit = reason
        delay = min(self.config.backoff_initial_s * 2 ** self._failures, self.config.backoff_max_s)
        self.state = "backoff"
        await asyncio.sleep(delay)
        self.restarts += 1
        self.state = "starting"
        try:
            self.process.start()  # on the event loop's thread: the guard's parent is this process
        except (VLLMStartError, OSError) as error:  # a stray server on the port, no memory to fork...
            self.last_exit = f"restart refused: {error}"
            logger.error("vLLM could not be restarted", extra={"error": str(error)})

    async def _until_ready(self) -> None:
        """Wait until the server is ready and the adapters are back; restart on failure."""
        while True:
            try:
                await self.process.wait_ready(self.config.ready_timeout_s)
                break
            except VLLMStartError as error:
                self._failures += 1
                await asyncio.to_thread(self.process.stop, 5.0)
                logger.error("vLLM did not become ready; restarting it", extra={"error": str(error)[:500]})
                await self._restart(f"not ready: {str(error)[:300]}")
        self.ready_since = time.monotonic()
        self.state = "warming_up"
        try:  # the first request costs ~20 s on a CPU: pay it here, not in a client's timeout
            await self.process.warm_up_async(self.config.ready_timeout_s)
        except httpx.HTTPError as error:
            logger.warning("vLLM warm-up failed; serving anyway", extra={"error": repr(error)[:300]})
        self.state = "reloading"
        try:
            self.reloaded = await self.on_ready()
        except Exception as error:  # the supervisor's boundary: a failed reload must not end supervision
            logger.exception("reloading the live adapters failed; their routes serve from the teacher")
            self.reloaded = {"error": f"{type(error).__name__}: {error}"}
        self.state = "ready"
        logger.info("vLLM ready; live adapters reloaded", extra={"restarts": self.restarts,
                                                                 "outcomes": self.reloaded})
