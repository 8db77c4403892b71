"""Replicas sharing one store behave as one gateway: each polls the store and applies what
another replica changed (route overrides, the live student version).

The store is the source of truth: one cheap query every ``store.sync_interval_s`` reads every
route's overrides and live version. Overrides are replaced by the store's; a live version
that differs from the route's pointer is followed the way the gateway restores one at start
(load the adapter on this replica's student servers — a server that already has it, because
the replicas share it, is fine — register its detector and learned router, switch, then
retire the old adapter). A follower never marks a version failed: the replica that
promoted it judged it; a version this replica cannot load is logged and tried again only
when the live version changes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from core.store import Store
from core.store.common import STORE_ERRORS, json_or_raw
from core.tasks import cancel_and_wait
from core.upstream import UpstreamFailure
from gateway.route_table import (
    BASE_MODEL_VERSION,
    RouteTable,
    StudentPointer,
    usable_overrides,
)
from gateway.training.swap import SwapError, Swapper

logger = logging.getLogger(__name__)

# Both tables are small (a row per overridden field, a live row per route): one round trip.
SYNC_SQL = ("select 'override' as kind, route, field as name, value_json from route_overrides "
            "union all select 'live' as kind, route, version as name, null as value_json "
            "from student_versions where status = 'live'")


def read_shared_state(store: Store) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(route -> stored overrides, route -> live version) as the store holds them now."""
    overrides: dict[str, dict[str, Any]] = {}
    live: dict[str, str] = {}
    for row in store.query(SYNC_SQL):
        if row["kind"] == "override":
            overrides.setdefault(row["route"], {})[row["name"]] = json_or_raw(row["value_json"])
        else:
            live[row["route"]] = row["name"]
    return overrides, live


class ReplicaSync:
    def __init__(self, routes: RouteTable, swapper: Swapper, store: Store, *, interval_s: float,
                 follow_promotions: Any = None) -> None:
        self.routes = routes
        self.swapper = swapper
        self.store = store
        self.interval_s = interval_s
        # Promotions are followed only once the start-up restore ran (the student answers):
        # before that, the restore itself loads the live version.
        self._follow_promotions = follow_promotions or (lambda: True)
        self._given_up: dict[str, str] = {}  # route -> the live version that would not load here
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="replica-sync")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.poll_once()
            except (*STORE_ERRORS, OSError) as error:  # the store is away: try again next time
                logger.warning("replica sync: store read failed", extra={"error": str(error)})

    async def poll_once(self) -> None:
        generation = self.routes.generation
        overrides, live = await asyncio.to_thread(read_shared_state, self.store)
        if self.routes.generation == generation:  # no local change raced the read
            self.apply_overrides(overrides)
        if self._follow_promotions():
            for state in self.routes:
                await self.follow_live(state.config.name, live.get(state.config.name))

    def apply_overrides(self, stored: dict[str, dict[str, Any]]) -> list[str]:
        """Replace each route's overrides with the store's; returns the routes that changed."""
        changed = []
        for state in self.routes:
            route = state.config.name
            usable, ignored = usable_overrides(route, stored.get(route, {}))
            if usable != state.overrides or ignored.keys() != state.ignored_overrides.keys():
                logger.info("route settings changed by another replica",
                            extra={"route": route, "from": state.overrides, "to": usable})
                state.overrides, state.ignored_overrides = usable, ignored
                changed.append(route)
        return changed

    async def follow_live(self, route: str, version: str | None) -> bool:
        """Serve ``version`` (None: no student) if the route serves another; True if switched."""
        state = self.routes.get(route)
        if _serving(state.student) == version or state.canary is not None or self._given_up.get(route) == version:
            return False
        lock = self.swapper.route_lock(route)
        if lock.locked():  # this replica is swapping the route itself: its own swap decides
            return False
        async with lock:
            # Read again under the lock: a swap of this replica's own may have finished since.
            live = await asyncio.to_thread(self.swapper.registry.live, route)
            version = live.version if live is not None else None
            if _serving(self.routes.get(route).student) == version:
                return False
            return await self._follow(route, version)

    async def _follow(self, route: str, version: str | None) -> bool:
        previous = self.routes.get(route).student
        if version is None:
            pointer = self.routes.initial_pointer(route)
        else:
            pointer = await self._load(route, version)
            if pointer is None:
                self._given_up[route] = version
                return False
        self._given_up.pop(route, None)
        self.routes.switch_student(route, pointer)
        logger.info("student switched by another replica's promotion",
                    extra={"route": route, "version": version, "previous": _serving(previous)})
        if previous is not None and (pointer is None or previous.adapter_name != pointer.adapter_name):
            await self.swapper.retire(route, previous)
        return True

    async def _load(self, route: str, version: str) -> StudentPointer | None:
        """The swapper's start-up load path for one version: on this replica's servers (any
        that has it already is fine), with its detector and learned router; None if it fails."""
        candidate = await asyncio.to_thread(self.swapper.registry.get, route, version)
        try:
            if candidate is None:
                raise SwapError("the store has no such version")
            pointer, _ = await self.swapper.load_live(candidate)
        except (SwapError, UpstreamFailure, OSError, ValueError, KeyError) as error:
            logger.error("replica sync: another replica's live version does not load here; the old one keeps "
                         "serving", extra={"route": route, "version": version, "error": str(error)})
            return None
        return pointer


def _serving(pointer: StudentPointer | None) -> str | None:
    """The store's name for what a pointer serves (the base model is no stored version)."""
    if pointer is None or pointer.version == BASE_MODEL_VERSION:
        return None
    return pointer.version
