"""Scheduled retraining: one apscheduler (3.x) job per route, inside the gateway's event loop.

Each tick checks whether at least ``training.min_new_examples`` teacher answers arrived
since the route's last training run; if so it runs ``distillgate train`` in a child process
(training must not take CPU time or the GIL from the gateway's request handling) and, when
the candidate passed the gate, promotes it through the :class:`~gateway.training.swap.Swapper`.
``max_instances=1`` and ``coalesce=True``: one run per route at a time, missed ticks merge.

Drift starts a cycle early (gateway/training/drift.py): while a route's recent traffic has
drifted past its configured level, a tick needs only ``drift.min_new_examples`` new answers,
and a check every ``DRIFT_CHECK_S`` brings the route's next tick forward rather than waiting
up to ``interval_minutes`` for it.

Replicas: when several gateway processes share one PostgreSQL store, exactly one schedules:
the one holding the store's leader lock (a PostgreSQL advisory lock, core/store/pg_lock.py).
Every replica asks for it every ``LEADER_CHECK_S`` and at each tick; a standby's ticks do
nothing, and when the leader dies its lock goes with its database session, so a standby
takes over at its next check. On SQLite the lock is always held, as before.

No torch here: the gateway imports this module at startup.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.config import RouteConfig, Settings
from core.store import Store
from gateway.training.canary import CanaryRollouts
from gateway.training.drift import DriftWatch
from gateway.training.swap import SwapError, Swapper

logger = logging.getLogger(__name__)

DRIFT_CHECK_S = 30.0  # a read of a few hundred floats per route: cheap enough to do often
LEADER_LOCK = "training-scheduler"
LEADER_CHECK_S = 5.0  # how soon a standby replica notices the leader is gone


class TrainingScheduler:
    def __init__(self, settings: Settings, store: Store, swapper: Swapper, *, config_path: str | Path,
                 python: str = sys.executable, cwd: str | Path | None = None,
                 extra_args: Sequence[str] = (), train_timeout_s: float = 3600.0,
                 drift: DriftWatch | None = None, canaries: CanaryRollouts | None = None) -> None:
        self.settings = settings
        self.store = store
        self.swapper = swapper
        self.config_path = str(config_path)
        self.python = python
        self.cwd = str(cwd) if cwd else None
        self.extra_args = list(extra_args)
        self.train_timeout_s = train_timeout_s
        self.drift = drift
        self.canaries = canaries
        self.scheduler: Any = None
        self._children: set[asyncio.subprocess.Process] = set()
        self.last_outcome: dict[str, dict[str, Any]] = {}
        self.leadership = store.leader_lock(LEADER_LOCK)
        self.leader = False  # as of the last check; metrics show it
        self.leader_check_s = LEADER_CHECK_S

    def start(self) -> None:
        """Add one interval job per route and start the scheduler on the running event loop."""
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        self.scheduler = AsyncIOScheduler()
        self.scheduler.add_job(self.check_leadership, "interval", id="leader", seconds=self.leader_check_s,
                               next_run_time=datetime.now(UTC), max_instances=1, coalesce=True)
        for route in self.settings.routes:
            self.scheduler.add_job(self.tick, "interval", args=[route.name], id=f"train:{route.name}",
                                   minutes=route.training.interval_minutes, max_instances=1, coalesce=True)
        if self.drift is not None and any(route.drift.triggers for route in self.settings.routes):
            self.scheduler.add_job(self.check_drift, "interval", id="drift", seconds=DRIFT_CHECK_S,
                                   max_instances=1, coalesce=True)
        self.scheduler.start()
        logger.info("training scheduler started", extra={"routes": [route.name for route in self.settings.routes]})

    async def shutdown(self) -> None:
        """Stop scheduling and end any training child (its checkpoint lets the next run resume)."""
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None
        for child in list(self._children):
            if child.returncode is None:
                child.terminate()
                try:
                    await asyncio.wait_for(child.wait(), 10.0)
                except TimeoutError:
                    child.kill()
        # Only now: a standby taking over must not start a run beside this one's still going.
        await asyncio.to_thread(self.leadership.release)
        self.leader = False

    async def check_leadership(self) -> bool:
        """Whether this process schedules (takes the lock when it is free)."""
        leader = await asyncio.to_thread(self.leadership.held)
        if leader != self.leader:
            logger.info("training scheduler " + ("leads" if leader else "stands by"),
                        extra={"lock": LEADER_LOCK})
        self.leader = leader
        return leader

    def new_examples(self, route: str) -> int:
        runs = self.store.training_runs(route)
        since = max((run["started_at"] or 0.0 for run in runs), default=0.0)
        return self.store.count_new_examples(route, since)  # a count query: no row is loaded

    async def tick(self, route: str) -> dict[str, Any]:
        """One scheduled check for ``route``; returns what happened (also kept in last_outcome)."""
        config = self.settings.route(route)
        assert config is not None, route
        try:
            leader = await self.check_leadership()
            outcome = await self._tick(config) if leader else {"action": "standby"}  # another replica schedules
        except Exception as error:  # the job's outer boundary: log it, the next tick retries
            logger.exception("scheduled training failed", extra={"route": route})
            outcome = {"action": "error", "error": f"{type(error).__name__}: {error}"}
        self.last_outcome[route] = {**outcome, "at": time.time()}
        return outcome

    async def check_drift(self) -> list[str]:
        """Bring forward the tick of every route whose drift calls for a cycle it has the new
        answers for; returns those routes. The tick decides again (and counts the cycle)."""
        pulled: list[str] = []
        if not await self.check_leadership():
            return pulled
        for config in self.settings.routes:
            if self.drift is None or self.drift.due(config.name) is None:
                continue
            if await asyncio.to_thread(self.new_examples, config.name) < config.drift.min_new_examples:
                continue
            job = self.scheduler.get_job(f"train:{config.name}") if self.scheduler is not None else None
            if job is not None:
                job.modify(next_run_time=datetime.now(UTC))
                pulled.append(config.name)
        return pulled

    async def _tick(self, config: RouteConfig) -> dict[str, Any]:
        if self.canaries is not None and (run := self.canaries.active(config.name)) is not None:
            return {"action": "canary_running", "version": run.version}  # one candidate at a time
        fresh = await asyncio.to_thread(self.new_examples, config.name)
        drift = self.drift.due(config.name) if self.drift is not None else None
        early = drift is not None and fresh >= config.drift.min_new_examples
        if not early and fresh < config.training.min_new_examples:
            return {"action": "waiting", "new_examples": fresh}
        if early:
            self.drift.record_retrain(config.name, drift, fresh)  # type: ignore[union-attr,arg-type]
        outcome = await self._train_and_promote(config, fresh)
        return {**outcome, "trigger": "drift", "drift": drift} if early else outcome

    async def _train_and_promote(self, config: RouteConfig, fresh: int) -> dict[str, Any]:
        candidate = await self.train_in_subprocess(config.name)
        if candidate is None:
            return {"action": "train_failed", "new_examples": fresh}
        if candidate.get("status") != "candidate":
            return {"action": "rejected", "version": candidate.get("version"), "note": candidate.get("note")}
        if self._canary_first(config):
            try:
                await self.canaries.begin(config.name, candidate["version"])  # type: ignore[union-attr]
            except SwapError as error:
                return {"action": "canary_failed", "version": candidate["version"], "error": str(error)}
            return {"action": "canary", "version": candidate["version"], "share": config.rollout.canary_share}
        try:
            swap = await self.swapper.promote(config.name, candidate["version"])
        except SwapError as error:
            return {"action": "promotion_failed", "version": candidate["version"], "error": str(error)}
        self.store.record_route_event(config.name, "scheduler", "promote", swap.previous, {"version": swap.version})
        return {"action": "promoted", "version": swap.version, "previous": swap.previous}

    def _canary_first(self, config: RouteConfig) -> bool:
        """A canary needs a live version to be compared with: the first one goes live at once."""
        return self.canaries is not None and config.rollout.enabled and self.canaries.has_live(config.name)

    def command(self, route: str) -> list[str]:
        return [self.python, "-m", "cli.main", "train", "--config", self.config_path, "--route", route,
                "--json", "--no-progress", *self.extra_args]

    async def train_in_subprocess(self, route: str) -> dict[str, Any] | None:
        """Run ``distillgate train`` in a child process; the candidate as JSON, or None on failure."""
        command = self.command(route)
        logger.info("training started", extra={"route": route, "command": command})
        child = await asyncio.create_subprocess_exec(*command, cwd=self.cwd, stdout=asyncio.subprocess.PIPE,
                                                     stderr=asyncio.subprocess.PIPE)
        self._children.add(child)
        try:
            stdout, stderr = await asyncio.wait_for(child.communicate(), self.train_timeout_s)
        except TimeoutError:
            child.kill()
            await child.wait()
            logger.error("training timed out", extra={"route": route, "timeout_s": self.train_timeout_s})
            return None
        finally:
            self._children.discard(child)
        if child.returncode != 0:
            logger.error("training failed", extra={"route": route, "returncode": child.returncode,
                                                   "stderr": stderr.decode(errors="replace")[-2000:]})
            return None
        return _last_json_line(stdout.decode(errors="replace"))


def _last_json_line(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def start_training_scheduler(settings: Settings, store: Store, swapper: Swapper, *, config_path: str | Path,
                             **options: Any) -> TrainingScheduler:
    """Called in the gateway's lifespan (on the event loop); ``await scheduler.shutdown()`` at exit."""
    scheduler = TrainingScheduler(settings, store, swapper, config_path=config_path, **options)
    scheduler.start()
    return scheduler
