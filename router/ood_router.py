"""``OODRouter``: the student serves a request unless its prompt is out of distribution.

Per request: embed the last user message, score it with the OOD detector fitted for the
route's live student version, and send it to the teacher when the score is over the route's
``ood_threshold``. Embedding and scoring of concurrent requests run as one batch in a
worker thread (``MicroBatcher``), so the event loop never does the CPU work.

Detectors are keyed by (route, student version): the hot swap registers the new version's
detector (``set_detector``/``load_detector``) before it flips the route's pointer, so the
first request on the new student is scored against the new training distribution.

Every score also goes to the route's drift window (``self.drift``, router/drift.py): one
append per request (the detector's novelty, which unlike the score counts prompts the teacher
answered out of scope as seen); the statistics are computed by whoever reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.modes import Mode
from core.prompting import user_text
from router.artifacts import create_embedder
from router.decision import Decision, RoutePolicy, decide_without_score
from router.drift import DriftMonitor, DriftStats
from router.embeddings import Embedder, MicroBatcher
from router.learned import LearnedRouter
from router.ood import EmbedderMismatch, OODDetector, check_embedder, load_detector

logger = logging.getLogger(__name__)

ScoreJob = tuple[OODDetector, str]
INLINE_GAP_S = 0.002  # a decision this soon after the previous one is batched, not inlined
# The OOD score, the prompt's embedding, the teacher's answers to its nearest training prompts,
# and the novelty drift reads (``KNNDetector.assess``; the score itself for other detectors).
ScoreResult = tuple[float, np.ndarray, tuple[int, ...], float]


def _limit_blas_threads() -> Any:
    """A reusable 'one BLAS thread' limiter, or None when threadpoolctl is unavailable.

    The scoring matmuls are small; a multi-threaded OpenBLAS spins its threads up per call and,
    measured on this 2-core machine under load, turned a 0.2 ms score into 8 ms.
    """
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - scikit-learn depends on it
        return None
    return ThreadpoolController()


class OODRouter:
    """Implements :class:`router.decision.Router` with embeddings and an OOD detector."""

    def __init__(
        self,
        embedder: Embedder | None = None,
        *,
        max_batch: int = 64,
        max_wait_ms: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self.embedder = embedder or Embedder()
        self._detectors: dict[tuple[str, str], OODDetector] = {}
        # Detectors refused for an embedder mismatch: their routes' auto traffic goes to the teacher.
        self._refused: dict[tuple[str, str], str] = {}
        # Learned routers, keyed like detectors: swapped in with the version they were trained for.
        self._learned: dict[tuple[str, str], LearnedRouter] = {}
        self._random = random.Random(seed)
        self._quiet_after = 0.0
        self._blas = _limit_blas_threads()
        self.drift = DriftMonitor()
        self._batcher: MicroBatcher[ScoreJob, ScoreResult] = MicroBatcher(
            self._score_batch, max_batch=max_batch, max_wait_ms=max_wait_ms, name="ood-router"
        )

    # -- detectors (called at startup and by the hot swap) -----------------------------------
    def set_detector(self, route: str, version: str, detector: OODDetector) -> None:
        """Register ``detector``; raises EmbedderMismatch when another embedder fitted it."""
        try:
            check_embedder(detector, self.embedder, where=f"of {route} {version}")
            if getattr(detector, "fits_texts", False):
                detector.bind(self.embedder)  # knn_tuned: its token rows in the served static table
        except EmbedderMismatch as error:
            self._refused[(route, version)] = str(error)
            logger.error("ood detector refused", extra={"route": route, "version": version, "error": str(error)})
            raise
        self._refused.pop((route, version), None)
        self._detectors[(route, version)] = detector
        logger.info("ood detector set", extra={"route": route, "version": version, "kind": detector.name,
                                               "embedder": self.embedder.id})

    def load_detector(self, route: str, version: str, path: str | Path) -> OODDetector:
        """Load a saved detector from disk and register it (blocking file read)."""
        detector = load_detector(path)
        self.set_detector(route, version, detector)
        return detector

    async def aload_detector(self, route: str, version: str, path: str | Path) -> OODDetector:
        """``load_detector`` in a worker thread, for callers on the event loop."""
        return await asyncio.to_thread(self.load_detector, route, version, path)

    def drop_detector(self, route: str, version: str) -> None:
        """Forget a retired version's detector and learned router."""
        self._detectors.pop((route, version), None)
        self._refused.pop((route, version), None)
        self._learned.pop((route, version), None)

    def detector(self, route: str, version: str | None) -> OODDetector | None:
        return self._detectors.get((route, version)) if version is not None else None

    def set_learned(self, route: str, version: str, model: LearnedRouter | None) -> None:
        """Register (None: remove) the learned router trained for ``version`` of ``route``."""
        if model is None:
            self._learned.pop((route, version), None)
        else:
            self._learned[(route, version)] = model

    def load_learned(self, route: str, version: str, path: str | Path) -> LearnedRouter:
        """Load a saved learned router and register it (blocking file read)."""
        model = LearnedRouter.load(path)
        if model.coef is not None and len(model.coef) != self.embedder.dim + 1:
            raise EmbedderMismatch(f"learned router of {route} {version} takes {len(model.coef) - 1}-dimensional "
                                   f"embeddings; the router's embedder {self.embedder.id} gives {self.embedder.dim}")
        self.set_learned(route, version, model)
        logger.info("learned router set", extra={"route": route, "version": version, **model.meta})
        return model

    async def aload_learned(self, route: str, version: str, path: str | Path) -> LearnedRouter:
        """``load_learned`` in a worker thread, for callers on the event loop."""
        return await asyncio.to_thread(self.load_learned, route, version, path)

    def learned(self, route: str, version: str | None) -> LearnedRouter | None:
        return self._learned.get((route, version)) if version is not None else None

    async def warmup(self) -> None:
        """Load the embedding model now rather than on the first request."""
        await asyncio.to_thread(self.embedder.encode, ["warm up"])

    # -- the decision ------------------------------------------------------------------------
    async def decide(self, policy: RoutePolicy, messages: list[dict[str, Any]]) -> Decision:
        detector = self.detector(policy.route, policy.student_version)
        refused = self._refused.get((policy.route, policy.student_version or ""))
        if refused is not None and policy.mode is Mode.auto and detector is None:
            return Decision("teacher", reasons=[f"ood detector refused: {refused}"])
        text = user_text(messages)
        if policy.mode is Mode.teacher_only or detector is None or not text.strip():
            decision = decide_without_score(policy)
            if detector is not None and policy.mode is Mode.auto and decision.target == "student":
                return Decision("teacher", reasons=["no user text to score"])
            return self._with_student_extras(policy, decision)
        # A static embedder costs well under a millisecond, and a hop to the worker thread
        # costs more than that on a loaded machine (measured: +15 ms p50 at load 9 on 2
        # cores): a lone request is scored on the loop. Requests that follow each other
        # closely go to the batcher, where one matrix product scores many at once.
        started = time.perf_counter()
        if self.embedder.inline and self._batcher.idle and started >= self._quiet_after:
            score, embedding, neighbours, novelty = self._score_batch([(detector, text)])[0]
        else:
            score, embedding, neighbours, novelty = await self._batcher.submit((detector, text))
        self._quiet_after = time.perf_counter() + INLINE_GAP_S
        self.drift.record(policy.route, policy.student_version, novelty)
        decision = self._decide_scored(policy, score, embedding)
        decision.neighbour_answers = neighbours
        return self._with_student_extras(policy, decision)

    def _decide_scored(self, policy: RoutePolicy, score: float, embedding: np.ndarray) -> Decision:
        if policy.mode is not Mode.auto:
            decision = decide_without_score(policy)
            decision.score = score
            return decision
        if score > policy.ood_threshold:
            return Decision("teacher", score, [f"ood_score {score:.3f} > ood_threshold {policy.ood_threshold:.3f}"])
        reasons = [f"ood_score {score:.3f} <= ood_threshold {policy.ood_threshold:.3f}"]
        learned = self.learned(policy.route, policy.student_version)
        if learned is not None and policy.learned_min_agree is not None:
            p_agree = float(learned.predict_agree(embedding, [score])[0])
            vetoed = p_agree < policy.learned_min_agree
            reasons.append(f"learned p_agree {p_agree:.3f} {'<' if vetoed else '>='} {policy.learned_min_agree:.3f}")
            return Decision("teacher" if vetoed else "student", score, reasons, extra={"p_agree": p_agree})
        return Decision("student", score, reasons)

    def _with_student_extras(self, policy: RoutePolicy, decision: Decision) -> Decision:
        """Cascade and shadow sampling apply to every student-served request."""
        if decision.target != "student":
            return decision
        if policy.confidence_threshold is not None:
            decision.cascade = True
            decision.reasons.append(f"cascade: confidence_threshold {policy.confidence_threshold}")
        if policy.shadow_rate > 0 and self._random.random() < policy.shadow_rate:
            decision.shadow = True
            decision.reasons.append(f"shadow sample (rate {policy.shadow_rate})")
        return decision

    def drift_stats(self, route: str, ood_threshold: float) -> DriftStats:
        """The route's drift window against ``ood_threshold`` and its version's training scores."""
        def train_p95(version: str | None) -> float | None:
            detector = self.detector(route, version)
            value = (getattr(detector, "meta", None) or {}).get("threshold_keep_95")
            return float(value) if value is not None else None

        return self.drift.stats(route, ood_threshold, train_p95)

    # -- batched work, in the worker thread --------------------------------------------------
    def _score_batch(self, jobs: list[ScoreJob]) -> list[ScoreResult]:
        embeddings = self.embedder.encode([text for _, text in jobs])
        scores = np.empty(len(jobs), dtype=np.float64)
        novelty = np.empty(len(jobs), dtype=np.float64)
        neighbours: list[tuple[int, ...]] = [()] * len(jobs)
        groups: dict[int, list[int]] = {}
        for index, (detector, _) in enumerate(jobs):
            groups.setdefault(id(detector), []).append(index)
        with self._blas.limit(limits=1, user_api="blas") if self._blas else contextlib.nullcontext():
            for indices in groups.values():
                detector = jobs[indices[0]][0]
                # knn_tuned scores the prompt under its own token table; the shared embedding
                # (cached) still goes to the learned router, which was trained on it.
                rows = (detector.embed_texts([jobs[i][1] for i in indices]) if getattr(detector, "fits_texts", False)
                        else embeddings[indices])
                if hasattr(detector, "assess"):
                    scores[indices], novelty[indices], nearest = detector.assess(rows)
                    if nearest is not None:
                        for row, index in enumerate(indices):
                            neighbours[index] = tuple(int(value) for value in nearest[row])
                else:
                    scores[indices] = novelty[indices] = detector.score(rows)
        return [(float(scores[i]), embeddings[i], neighbours[i], float(novelty[i])) for i in range(len(jobs))]

    def close(self) -> None:
        self._batcher.close()
        self.embedder.close()


def build_ood_router(settings: Any, store: Any, *, embedder: Embedder | None = None) -> OODRouter:
    """The gateway's router: one detector per route's live student version, from the store.

    Reads ``student_versions.detector_path`` of each route's live version; a route whose live
    version has none routes by mode rules only until the hot swap registers one (the hot swap,
    and its restore at start, also registers the version's learned router). The embedder is the
    one ``settings.router`` names (built here if ``init-router`` has not built it yet); a
    detector fitted with another is refused. The embedder warms up in a background thread.
    """
    router = OODRouter(embedder or create_embedder(settings.router, build=True, lazy=True))
    loaded = 0
    for route in settings.routes:
        live = store.live_version(route.name)
        path = (live or {}).get("detector_path")
        if path and (Path(path).exists() or Path(f"{path}.npz").exists()):
            with contextlib.suppress(EmbedderMismatch):  # logged; auto traffic goes to the teacher
                router.load_detector(route.name, live["version"], path)
                loaded += 1
        elif live is not None:
            logger.warning("live student has no ood detector", extra={"route": route.name, "version": live["version"]})
    if loaded:
        threading.Thread(target=router.embedder.encode, args=(["warm up"],), name="embed-warmup", daemon=True).start()
    return router
