"""Scheduled retention inside ``serve``: every ``store.purge_interval_s``, delete request and
shadow rows older than ``store.retention_days`` (the same deletion as ``distillgate purge``).
A failed purge is logged and tried again at the next interval; serving is never affected."""

from __future__ import annotations

import asyncio
import logging
import time

from core.config import StoreConfig
from core.store import STORE_ERRORS
from core.tasks import cancel_and_wait

logger = logging.getLogger(__name__)


def retention_cutoff(retention_days: float, now: float | None = None) -> float:
    return (time.time() if now is None else now) - retention_days * 86_400


class RetentionTask:
    def __init__(self, store: object, config: StoreConfig) -> None:
        self._store = store
        self._config = config
        self._task: asyncio.Task[None] | None = None
        self.last_deleted: dict[str, int] = {}

    def start(self) -> None:
        purge = getattr(self._store, "purge_before", None)
        if self._config.retention_days is None or purge is None:
            return
        self._task = asyncio.create_task(self._run(), name="retention")

    async def _run(self) -> None:
        assert self._config.retention_days is not None
        while True:
            cutoff = retention_cutoff(self._config.retention_days)
            try:
                self.last_deleted = await asyncio.to_thread(self._store.purge_before, cutoff)  # type: ignore[attr-defined]
            except STORE_ERRORS as error:
                logger.error("retention purge failed", extra={"error": str(error)})
            else:
                if any(self.last_deleted.values()):
                    logger.info("retention purge", extra={"cutoff": cutoff, **self.last_deleted})
            await asyncio.sleep(self._config.purge_interval_s)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
