"""Drift: how far a route's recent traffic has moved from its live student's training prompts.

The router appends each scored request's novelty to its route's window, a bounded deque:
the only drift work on the request path. Novelty is the OOD score against every training
prompt, those the teacher answered out of scope included (``cascade.mask_escalated_prompts``
masks them out of the OOD score)
(``KNNDetector.assess``); for other detectors it is the OOD score. Statistics are read off
the window elsewhere (the training schedule, a metrics scrape, the dashboard):

- ``ood_share``: the share of the window above the route's ``ood_threshold``, i.e. of the
  traffic the router sends to the teacher because the student does not know it (with the mask,
  prompts like the route's known out-of-scope ones aside: no retrain would serve them). Read with
  the threshold live at the time, so an operator's change applies to the whole window.
- ``novel_share``: the share above the 95th percentile of the detector's own training scores
  (``meta["threshold_keep_95"]``; leave-one-out for the kNN detector). A new prompt drawn
  like the training prompts is exchangeable with them, so it lands above that percentile with
  probability ~0.05 whatever the training set's size or the operator's threshold: the count
  is about Binomial(n, 0.05) without drift, and ``novel_z`` is its standard score. (Only
  ~0.05: the PCA basis and the centroids saw every training prompt; a Mahalanobis detector's
  percentile is in-sample, so its no-drift share sits somewhat higher.)

A window belongs to one student version: when the live version changes it starts again,
since the old scores measured the distance to another training set.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from core.route_config import DriftConfig

DEFAULT_WINDOW = 500
# The training scores' 95th percentile: the share of in-distribution prompts expected above it.
EXPECTED_NOVEL_SHARE = 0.05


@dataclass(frozen=True)
class DriftStats:
    """One route's window, summarised; the shares are None on an empty window (or, for
    ``novel_share``, when the detector recorded no training percentile)."""

    version: str | None
    requests: int  # scores in the window
    seen: int  # scores recorded for this version since its window started
    ood_threshold: float
    ood_share: float | None = None
    mean_score: float | None = None
    train_p95: float | None = None
    novel_share: float | None = None
    novel_z: float | None = None


def summarise(scores: list[float], version: str | None, seen: int, ood_threshold: float,
              train_p95: float | None) -> DriftStats:
    """The statistics of one window's scores (plain Python: 500 floats take ~20 us)."""
    n = len(scores)
    if n == 0:
        return DriftStats(version, 0, seen, ood_threshold, train_p95=train_p95)
    novel_share = novel_z = None
    if train_p95 is not None:
        novel_share = sum(1 for score in scores if score > train_p95) / n
        spread = math.sqrt(EXPECTED_NOVEL_SHARE * (1 - EXPECTED_NOVEL_SHARE) / n)
        novel_z = (novel_share - EXPECTED_NOVEL_SHARE) / spread
    return DriftStats(version, n, seen, ood_threshold,
                      ood_share=sum(1 for score in scores if score > ood_threshold) / n,
                      mean_score=sum(scores) / n, train_p95=train_p95, novel_share=novel_share, novel_z=novel_z)


def drift_reason(stats: DriftStats, config: DriftConfig) -> str | None:
    """Why the window calls for an early training cycle, or None: too few scores, no maximum
    configured, or none crossed. Cooldowns are the caller's business."""
    if stats.requests < config.min_requests:
        return None
    if config.max_ood_share is not None and stats.ood_share is not None and stats.ood_share > config.max_ood_share:
        return (f"ood_share {stats.ood_share:.3f} > max_ood_share {config.max_ood_share:.3f} "
                f"(last {stats.requests} requests, ood_threshold {stats.ood_threshold:.3f})")
    if (config.max_novel_share is not None and stats.novel_share is not None
            and stats.novel_share > config.max_novel_share):
        return (f"novel_share {stats.novel_share:.3f} > max_novel_share {config.max_novel_share:.3f} "
                f"(last {stats.requests} requests; ~{EXPECTED_NOVEL_SHARE} without drift)")
    return None


class _Window:
    def __init__(self, size: int, version: str | None) -> None:
        self.version = version
        self.scores: deque[float] = deque(maxlen=size)
        self.seen = 0


class DriftMonitor:
    """Per route, the OOD scores of the last ``window`` requests of its live version.

    ``record`` runs on the event loop for every scored request; readers run in worker
    threads (a metrics scrape), hence the lock, held for an append or a copy only.
    """

    def __init__(self, default_window: int = DEFAULT_WINDOW) -> None:
        self.default_window = default_window
        self._sizes: dict[str, int] = {}
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def configure(self, route: str, window: int) -> None:
        """Set a route's window size (a window of another size starts again)."""
        with self._lock:
            self._sizes[route] = window
            current = self._windows.get(route)
            if current is not None and current.scores.maxlen != window:
                del self._windows[route]

    def record(self, route: str, version: str | None, score: float) -> None:
        with self._lock:
            window = self._windows.get(route)
            if window is None or window.version != version:
                window = self._windows[route] = _Window(self._sizes.get(route, self.default_window), version)
            window.scores.append(score)
            window.seen += 1

    def stats(self, route: str, ood_threshold: float,
              train_p95: Callable[[str | None], float | None] = lambda version: None) -> DriftStats:
        """The route's window summarised; ``train_p95(version)`` gives the reference percentile."""
        with self._lock:
            window = self._windows.get(route)
            version, scores, seen = (window.version, list(window.scores), window.seen) if window else (None, [], 0)
        return summarise(scores, version, seen, ood_threshold, train_p95(version))
