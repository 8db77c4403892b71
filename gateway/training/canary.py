"""Canary rollout: a candidate that passed the gate serves a share of its route's student
traffic beside the live version until the sequential test (router/canary.py) promotes it or
rolls it back.

The evidence arrives in memory: the chat service's request observer counts what each arm
served, the shadow runner reports each comparison with the teacher, the feedback service
each rating of an answer. A check every ``check_interval_s`` takes a look when one is due
(or the run timed out, or feedback blocks it) and acts on the verdict. Every look and every
ending goes to the route's audit log with its evidence, and to the counts metrics read.

A canary lives in this process only: a restart ends it (the version stays a ``candidate``,
serving nothing; the next cycle trains a newer one, or an operator promotes it by hand).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from core.store import Store
from gateway.canary_run import CanaryRun
from gateway.chat.record import RequestRecord
from gateway.errors import RouteNotFound
from gateway.route_table import RouteTable
from gateway.training.swap import SwapError, Swapper
from router.canary import Verdict, decide, feedback_blocks, looks_due

logger = logging.getLogger(__name__)

SCORE_NEGATIVE_BELOW = 0.5  # a feedback score under this counts as negative, like a thumbs-down
ACTOR = "canary"
DEFAULT_MANUAL_SHARE = 0.1


class CanaryRollouts:
    def __init__(self, routes: RouteTable, swapper: Swapper, store: Store, *, check_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.routes = routes
        self.swapper = swapper
        self.store = store
        self.check_interval_s = check_interval_s
        self.clock = clock
        self.decisions: Counter[tuple[str, str]] = Counter()  # (route, action): what metrics count
        self.last_outcome: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task[None] | None = None
        # Runs being ended: no new request picks them, but answers still in flight count for them.
        self._ending: dict[str, CanaryRun] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="canary-checks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def has_live(self, route: str) -> bool:
        """Whether the route has a live student a canary could be compared with."""
        return self.routes.get(route).student is not None

    def active(self, route: str) -> CanaryRun | None:
        return self.routes.get(route).canary

    async def begin(self, route: str, version: str, actor: str = "scheduler") -> CanaryRun:
        """Load ``version`` beside the live one and give it its share; raises SwapError."""
        state = self.routes.get(route)
        if state.canary is not None:
            raise SwapError(f"route {route!r} already runs a canary ({state.canary.version})")
        live = state.student
        if live is None:
            raise SwapError(f"route {route!r} has no live student to compare a canary with")
        pointer = await self.swapper.load_canary(route, version)
        rollout = state.config.rollout
        if not rollout.enabled:  # an operator's canary on a route configured without one
            rollout = rollout.model_copy(update={"canary_share": DEFAULT_MANUAL_SHARE})
        run = CanaryRun.begin(pointer, live.version, rollout, float(state.setting("shadow_rate")))
        state.canary = run
        self._audit(route, actor, "canary_start", live.version, run.describe())
        logger.info("canary started", extra={"route": route, "version": version, "live": live.version,
                                             "share": run.config.canary_share})
        return run

    # -- evidence ----------------------------------------------------------------------------
    def observe_request(self, record: RequestRecord) -> None:
        """Request observer: a student-served answer counts for the arm that gave it."""
        arm = self._arm(record.route, record.student_version)
        if arm is not None and record.target == "student" and record.status_code < 400:
            arm.served += 1

    def observe_shadow(self, record: RequestRecord, agree: bool) -> None:
        """Shadow observer: one comparison of a served student answer with the teacher's."""
        arm = self._arm(record.route, record.student_version)
        if arm is not None and record.target == "student":
            arm.compared += 1
            arm.agreed += int(agree)

    def observe_feedback(self, route: str, target: str, version: str | None, rating: str | None,
                         score: float | None) -> None:
        """Feedback observer: a thumbs-down or a low score counts against the answer's arm."""
        arm = self._arm(route, version)
        if arm is None or target != "student":
            return
        arm.feedback += 1
        if rating == "down" or (score is not None and score < SCORE_NEGATIVE_BELOW):
            arm.negative_feedback += 1

    def _arm(self, route: str, version: str | None) -> Any:
        try:
            run = self.routes.get(route).canary or self._ending.get(route)
        except RouteNotFound:  # a request row of a route gone from the config
            return None
        return run.arm(version) if run is not None else None

    # -- the test ----------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval_s)
            for state in list(self.routes):
                if state.canary is None:
                    continue
                try:
                    await self.check(state.config.name)
                except Exception:  # the loop is an outer boundary: log it, check again next time
                    logger.exception("canary check failed", extra={"route": state.config.name})

    async def check(self, route: str) -> Verdict | None:
        """Take a look when one is due and act on it; returns the verdict (None: no look)."""
        run = self.active(route)
        if run is None or route in self._ending:
            return None
        look = looks_due(run.canary, run.live, run.config)
        timed_out = run.timed_out(self.clock())
        if look <= run.looks_done and not timed_out and not feedback_blocks(run.canary, run.live, run.config):
            return None
        # Clopper-Pearson needs scipy: its first import takes a while, never on the event loop.
        verdict = await asyncio.to_thread(decide, run.canary, run.live, run.config, look, timed_out=timed_out)
        if self.active(route) is not run or route in self._ending:
            return None  # an operator ended it meanwhile
        run.looks_done, run.last_verdict = max(look, run.looks_done), verdict
        if verdict.action == "wait":
            self._audit(route, ACTOR, "canary_look", run.live_version, self._evidence(run, verdict))
            return verdict
        if verdict.action == "promote":
            await self.promote(route, ACTOR, verdict)
        else:
            await self.rollback(route, ACTOR, verdict)
        return verdict

    # -- endings -----------------------------------------------------------------------------
    async def promote(self, route: str, actor: str, verdict: Verdict | None = None) -> dict[str, Any]:
        """The canary becomes the live version (all the route's student traffic)."""
        run = self._take(route)
        evidence = self._evidence(run, verdict)
        try:
            swap = await self.swapper.promote(route, run.version)
        except SwapError as error:
            self.routes.get(route).canary = None
            await self.swapper.unload_canary(route, run.pointer, "candidate", f"canary promotion failed: {error}")
            return self._ended(route, actor, run, "promotion_failed", {**evidence, "error": str(error)})
        finally:
            self._ending.pop(route, None)
        self.routes.get(route).canary = None
        return self._ended(route, actor, run, "promote", {**evidence, "previous": swap.previous})

    async def rollback(self, route: str, actor: str, verdict: Verdict | None = None) -> dict[str, Any]:
        """Stop routing to the canary, drain and unload it; live keeps serving. A canary the
        test rolled back is ``rejected``; one an operator rolled back too."""
        return await self._retire(route, actor, verdict, "rollback", "rejected")

    async def abandon(self, route: str, actor: str) -> dict[str, Any]:
        """End the canary without judging it (an operator promotes another version by hand):
        it goes back to being a ``candidate``."""
        return await self._retire(route, actor, None, "abandon", "candidate")

    async def abandon_all(self, actor: str) -> list[str]:
        """End every running canary unjudged (the student server restarted and forgot the
        canaries' adapters); returns the routes."""
        ended = [state.config.name for state in self.routes if state.canary is not None]
        for route in ended:
            await self.abandon(route, actor)
        return ended

    async def _retire(self, route: str, actor: str, verdict: Verdict | None, action: str,
                      status: str) -> dict[str, Any]:
        run = self._take(route)
        self.routes.get(route).canary = None  # from here on no new request picks the canary
        try:
            note = f"canary {action} by {actor}" + (f": {verdict.reason}" if verdict else "")
            drained = await self.swapper.unload_canary(route, run.pointer, status, note)
        finally:
            self._ending.pop(route, None)
        return self._ended(route, actor, run, action, {**self._evidence(run, verdict), "drained": drained})

    def _take(self, route: str) -> CanaryRun:
        run = self.active(route)
        if run is None or route in self._ending:
            raise SwapError(f"route {route!r} runs no canary")
        self._ending[route] = run
        return run

    def _ended(self, route: str, actor: str, run: CanaryRun, action: str, evidence: dict[str, Any]) -> dict[str, Any]:
        self.decisions[(route, action)] += 1
        outcome = {"action": action, "version": run.version, "actor": actor, **evidence, "at": self.clock()}
        self.last_outcome[route] = outcome
        self._audit(route, actor, f"canary_{action}", run.live_version, outcome)
        logger.info("canary ended", extra={"route": route, "version": run.version, "action": action, "actor": actor,
                                           "reason": (evidence.get("verdict") or {}).get("reason")})
        return outcome

    def _evidence(self, run: CanaryRun, verdict: Verdict | None) -> dict[str, Any]:
        return {"version": run.version, "live_version": run.live_version, "canary": run.canary.to_dict(),
                "live": run.live.to_dict(), "duration_s": self.clock() - run.started_at,
                "verdict": verdict.to_dict() if verdict is not None else None}

    def _audit(self, route: str, actor: str, action: str, old: Any, new: Any) -> None:
        self.store.record_route_event(route, actor, action, old, new)

    def status(self, route: str) -> dict[str, Any]:
        """The route's canary now (None when none runs), its last ending, and the counts."""
        run = self.routes.get(route).canary
        return {"active": run.describe() if run is not None else None, "last": self.last_outcome.get(route),
                "decisions": {action: count for (name, action), count in self.decisions.items() if name == route}}
