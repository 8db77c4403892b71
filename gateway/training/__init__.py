"""The gateway's side of the training loop: hot swap, restoring live adapters, the schedule.

vLLM forgets runtime-loaded adapters when it restarts, and it may still be starting when
the gateway comes up; so the live versions are loaded in the background once the student
answers its health check. Until then (and if that fails) the route serves from the teacher.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from core.config import Settings
from core.store import Store
from core.tasks import cancel_and_wait
from core.upstream import StudentBackend
from gateway.route_table import RouteTable
from gateway.training.canary import CanaryRollouts
from gateway.training.drift import DriftWatch
from gateway.training.replica_sync import ReplicaSync
from gateway.training.schedule import TrainingScheduler
from gateway.training.swap import Swapper

logger = logging.getLogger(__name__)


class TrainingLoop:
    def __init__(self, settings: Settings, store: Store, student: StudentBackend, routes: RouteTable,
                 router: Any, config_path: Path | None, *, restore_timeout_s: float = 1800.0) -> None:
        detectors = router if hasattr(router, "aload_detector") else None
        self.student = student
        self.swapper = Swapper(student, routes, store, route_configs={route.name: route for route in settings.routes},
                               detectors=detectors, max_lora_rank=settings.vllm.max_lora_rank)
        # Tracked whether or not retraining is scheduled: metrics and the dashboard show it.
        self.drift = DriftWatch(settings, routes, router, store)
        self.canaries = CanaryRollouts(routes, self.swapper, store)
        # Scheduled retraining needs the config file: the training child process reads it.
        self.scheduler = TrainingScheduler(settings, store, self.swapper, config_path=config_path, drift=self.drift,
                                           canaries=self.canaries) if config_path is not None else None
        # Other replicas on the same store: their admin changes and promotions reach this one.
        self.replica_sync = ReplicaSync(routes, self.swapper, store, interval_s=settings.store.sync_interval_s,
                                        follow_promotions=lambda: self.restored is not None)
        self.restore_timeout_s = restore_timeout_s
        self.restored: dict[str, str] | None = None
        self._restore_task: asyncio.Task[None] | None = None

    def start(self, *, restore: bool = True) -> None:
        """Start the schedule; ``restore=False`` when a supervisor reloads the adapters each
        time the server it launched becomes ready (see gateway/vllm_supervisor.py)."""
        self.canaries.start()
        self.replica_sync.start()
        if restore:
            self._restore_task = asyncio.create_task(self._restore_when_ready(), name="restore-live-students")
        if self.scheduler is not None:
            self.scheduler.start()

    async def restore_now(self) -> dict[str, str]:
        """Load every route's live adapter into the (re)started server; returns the outcomes.
        A canary's adapter is gone with the old server: its canary ends, unjudged."""
        await self.canaries.abandon_all("student server restart")
        self.restored = await self.swapper.restore_live()
        return self.restored

    async def _restore_when_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.restore_timeout_s
        while not await self.student.healthy():
            if loop.time() > deadline:
                logger.error("student server never became healthy; live students not restored")
                return
            await asyncio.sleep(2.0)
        self.restored = await self.swapper.restore_live()
        logger.info("live students restored", extra={"outcomes": self.restored})

    async def stop(self) -> None:
        await self.replica_sync.stop()
        await self.canaries.stop()
        await cancel_and_wait(self._restore_task)
        if self.scheduler is not None:
            await self.scheduler.shutdown()
