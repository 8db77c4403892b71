"""The gateway's view of drift: per route, the router's drift statistics against the live
threshold, whether they call for an early training cycle, and the cycles drift started.

The training schedule asks :meth:`DriftWatch.due` on its ticks (and every
``DRIFT_CHECK_S``); metrics, the admin API and the dashboard read :meth:`DriftWatch.status`.
A drift-started cycle is logged, counted and written to the route's audit log (so the last
one survives a restart and cools the next one down).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from core.config import Settings
from core.store import Store
from gateway.route_table import RouteTable
from router.drift import EXPECTED_NOVEL_SHARE, DriftStats, drift_reason

logger = logging.getLogger(__name__)

AUDIT_ACTION = "drift_retrain"


class DriftWatch:
    def __init__(self, settings: Settings, routes: RouteTable, router: Any, store: Store,
                 clock: Callable[[], float] = time.time) -> None:
        self._configs = {route.name: route.drift for route in settings.routes}
        self._routes = routes
        self._store = store
        self._clock = clock
        # Only the OOD router scores requests; with another router there is nothing to watch.
        self._router = router if hasattr(router, "drift_stats") else None
        if self._router is not None:
            for name, config in self._configs.items():
                router.drift.configure(name, config.window)
        self.retrains: Counter[str] = Counter()
        self.last_retrain: dict[str, dict[str, Any]] = {name: last for name in self._configs
                                                         if (last := self._last_from_audit(name))}

    def _last_from_audit(self, route: str) -> dict[str, Any] | None:
        for row in self._store.route_audit(route):  # newest first
            if row["field"] == AUDIT_ACTION:
                return {**json.loads(row["new_json"] or "{}"), "at": row["at"]}
        return None

    def stats(self, route: str) -> DriftStats | None:
        if self._router is None:
            return None
        return self._router.drift_stats(route, self._routes.get(route).policy().ood_threshold)

    def due(self, route: str) -> str | None:
        """Why ``route`` should start a training cycle now, or None (no trigger configured, no
        drift, or the last drift cycle is too recent: within ``cooldown_minutes``, or fewer
        than ``min_requests`` scores of the same version since)."""
        config = self._configs[route]
        stats = self.stats(route) if config.triggers else None
        reason = drift_reason(stats, config) if stats is not None else None
        last = self.last_retrain.get(route)
        if reason is None or last is None:
            return reason
        if self._clock() - last["at"] < config.cooldown_minutes * 60:
            return None
        if last.get("version") == stats.version and stats.seen - last.get("seen", 0) < config.min_requests:
            return None  # no fresh window of evidence since the last trigger
        return reason

    def record_retrain(self, route: str, reason: str, new_examples: int) -> None:
        """A cycle starts because of drift: count, log and audit it (before training, so a
        failed cycle still cools the next one down)."""
        stats = self.stats(route)
        detail = {"reason": reason, "new_examples": new_examples, "version": stats.version if stats else None,
                  "seen": stats.seen if stats else 0, "ood_share": stats.ood_share if stats else None,
                  "novel_share": stats.novel_share if stats else None}
        self.retrains[route] += 1
        self.last_retrain[route] = {**detail, "at": self._clock()}
        logger.warning("drift: training cycle started early", extra={"route": route, **detail})
        self._store.record_route_event(route, "scheduler", AUDIT_ACTION, None, detail)

    def status(self, route: str) -> dict[str, Any]:
        """What the admin API and the dashboard show (plain JSON)."""
        config = self._configs[route]
        stats = self.stats(route)
        return {
            "tracked": stats is not None,
            **(asdict(stats) if stats is not None else {}),
            "expected_novel_share": EXPECTED_NOVEL_SHARE,
            "config": config.model_dump(),
            # The trigger's verdict on the window, cooldown aside (None: no drift, or no trigger set).
            "drift_reason": drift_reason(stats, config) if stats is not None and config.triggers else None,
            "retrains": self.retrains[route],  # drift-started cycles since this process started
            "last_retrain": self.last_retrain.get(route),
        }
