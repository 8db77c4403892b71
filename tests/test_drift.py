"""Drift: the window statistics, the trigger and its cooldown (router/drift.py,
gateway/training/drift.py), without HTTP or training."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.config import ConfigError, parse_settings
from core.modes import Mode
from core.route_config import DriftConfig
from core.store import SQLiteStore
from gateway.route_table import RouteTable, StudentPointer
from gateway.training.drift import DriftWatch
from router.decision import RoutePolicy
from router.drift import EXPECTED_NOVEL_SHARE, DriftMonitor, drift_reason, summarise
from router.embeddings import Embedder
from router.ood import KNNDetector
from router.ood_router import OODRouter
from tests.test_router_decide import LengthDetector, LengthModel

ROUTE = "r"


def test_summary_counts_the_shares_above_the_threshold_and_the_training_percentile() -> None:
    scores = [0.1] * 6 + [0.4] * 2 + [0.9] * 2  # threshold 0.5: 2 of 10 above; p95 0.3: 4 of 10
    stats = summarise(scores, "v1", 12, ood_threshold=0.5, train_p95=0.3)
    assert (stats.requests, stats.seen, stats.version) == (10, 12, "v1")
    assert stats.ood_share == pytest.approx(0.2) and stats.novel_share == pytest.approx(0.4)
    assert stats.mean_score == pytest.approx((0.6 + 0.8 + 1.8) / 10)
    assert stats.novel_z == pytest.approx((0.4 - 0.05) / np.sqrt(0.05 * 0.95 / 10))
    # A score equal to the threshold stays on the student (the router sends only > to the teacher).
    assert summarise([0.5], None, 1, 0.5, None).ood_share == 0
    empty = summarise([], None, 0, 0.5, 0.3)
    assert empty.requests == 0 and empty.ood_share is None and empty.novel_share is None
    assert summarise([0.9], None, 1, 0.5, None).novel_share is None  # no percentile recorded


def test_fresh_prompts_exceed_the_knn_training_percentile_about_five_percent_of_the_time() -> None:
    """The reason novel_share is comparable across versions: ~0.05 without drift, whatever the data."""
    rng = np.random.default_rng(1)
    centres, elsewhere = rng.normal(size=(10, 32)) * 2, rng.normal(size=(5, 32)) * 2

    def draw(n: int, around: np.ndarray) -> tuple[np.ndarray, list[str]]:
        labels = rng.integers(0, len(around), n)
        return around[labels] + rng.normal(size=(n, 32)), [str(label) for label in labels]

    detector = KNNDetector().fit(*draw(1000, centres))
    p95 = detector.meta["threshold_keep_95"]
    same = summarise(detector.score(draw(2000, centres)[0]).tolist(), "v1", 2000, 0.5, p95)
    shifted = summarise(detector.score(draw(500, elsewhere)[0]).tolist(), "v1", 500, 0.5, p95)
    assert 0.025 < same.novel_share < 0.1 and abs(same.novel_z) < 4
    assert shifted.novel_share > 0.9 and shifted.novel_z > 20


@pytest.mark.parametrize(
    ("config", "scores", "triggered"),
    [
        ({}, [0.9] * 10, None),  # no maximum configured: tracked, never a trigger
        ({"max_ood_share": 0.3}, [0.9] * 9, None),  # fewer than min_requests
        ({"max_ood_share": 0.3}, [0.9] * 3 + [0.1] * 7, None),  # 0.3 is not above 0.3
        ({"max_ood_share": 0.3}, [0.9] * 4 + [0.1] * 6, "ood_share 0.400 > max_ood_share 0.300"),
        ({"max_novel_share": 0.2}, [0.4] * 3 + [0.1] * 7, "novel_share 0.300 > max_novel_share 0.200"),
        ({"max_novel_share": 0.4}, [0.4] * 3 + [0.1] * 7, None),
    ],
)
def test_the_trigger_needs_enough_requests_and_a_maximum_crossed(config: dict[str, Any], scores: list[float],
                                                                 triggered: str | None) -> None:
    drift = DriftConfig(window=20, min_requests=10, **config)
    reason = drift_reason(summarise(scores, "v1", len(scores), ood_threshold=0.5, train_p95=0.3), drift)
    assert reason == triggered if triggered is None else triggered in reason


def test_the_window_is_bounded_and_starts_again_with_a_new_version() -> None:
    monitor = DriftMonitor()
    monitor.configure(ROUTE, 10)
    for _ in range(25):
        monitor.record(ROUTE, "v1", 0.9)
    stats = monitor.stats(ROUTE, 0.5)
    assert (stats.requests, stats.seen, stats.ood_share) == (10, 25, 1.0)
    monitor.record(ROUTE, "v2", 0.1)  # a new version: the old scores measured another training set
    stats = monitor.stats(ROUTE, 0.5)
    assert (stats.version, stats.requests, stats.seen, stats.ood_share) == ("v2", 1, 1, 0.0)
    monitor.configure(ROUTE, 10)
    assert monitor.stats(ROUTE, 0.5).requests == 1  # the same size: the window is kept
    monitor.configure(ROUTE, 20)
    assert monitor.stats(ROUTE, 0.5).requests == 0
    assert monitor.stats("other", 0.5).requests == 0


def test_drift_config_is_validated_and_triggers_nothing_by_default() -> None:
    route = {"name": ROUTE, "teacher": {"model": "openai/x"}}
    assert not parse_settings({"routes": [route]}).routes[0].drift.triggers
    with pytest.raises(ConfigError, match=r"routes\.0\.drift: .*min_requests 600 is above window 500"):
        parse_settings({"routes": [{**route, "drift": {"min_requests": 600}}]})
    with pytest.raises(ConfigError, match=r"routes\.0\.drift\.max_ood_share"):
        parse_settings({"routes": [{**route, "drift": {"max_ood_share": 1.5}}]})
    with pytest.raises(ConfigError, match=r"routes\.0\.drift\.windw: unknown key"):
        parse_settings({"routes": [{**route, "drift": {"windw": 100}}]})


async def test_the_router_records_each_score_and_reads_the_versions_training_percentile() -> None:
    detector = LengthDetector()
    detector.meta = {"threshold_keep_95": 0.45}  # scores are the prompt's length / 10
    router = OODRouter(Embedder(model=LengthModel(), cache_bytes=0), seed=0)
    router.set_detector(ROUTE, "v1", detector)
    try:
        live = RoutePolicy(ROUTE, Mode.auto, 0.5, None, 0.0, "v1")
        for text in ("hey", "hi", "a much longer prompt"):
            await router.decide(live, [{"role": "user", "content": text}])
        await router.decide(RoutePolicy(ROUTE, Mode.teacher_only, 0.5, None, 0.0, "v1"),
                            [{"role": "user", "content": "not scored at all"}])
        stats = router.drift_stats(ROUTE, 0.5)
    finally:
        router.close()
    assert (stats.version, stats.requests, stats.train_p95) == ("v1", 3, 0.45)
    assert stats.ood_share == pytest.approx(1 / 3) and stats.novel_share == pytest.approx(1 / 3)


# -- the watch: the trigger with its cooldown, against the live threshold ------------------------
class WindowRouter:
    """Only the router's drift side: a window and the training percentile of every version."""

    def __init__(self, train_p95: float | None = 0.3) -> None:
        self.drift = DriftMonitor()
        self.train_p95 = train_p95

    def drift_stats(self, route: str, ood_threshold: float) -> Any:
        return self.drift.stats(route, ood_threshold, lambda version: self.train_p95)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def watch_parts(tmp_path: Path, **drift: Any) -> tuple[Any, SQLiteStore, RouteTable]:
    settings = parse_settings({"store": {"path": str(tmp_path / "db.sqlite")}, "routes": [{
        "name": ROUTE, "teacher": {"model": "openai/x"}, "ood_threshold": 0.5,
        "drift": {"window": 20, "min_requests": 10, "cooldown_minutes": 10, **drift}}]})
    store = SQLiteStore(settings.store.path)
    routes = RouteTable(settings, store)
    routes.switch_student(ROUTE, StudentPointer("v1", f"{ROUTE}@v1"))
    return settings, store, routes


def test_the_watch_triggers_then_cools_down_for_a_while_and_a_window(tmp_path: Path) -> None:
    settings, store, routes = watch_parts(tmp_path, max_ood_share=0.5)
    router, clock = WindowRouter(), Clock()
    watch = DriftWatch(settings, routes, router, store, clock=clock)
    for _ in range(10):
        router.drift.record(ROUTE, "v1", 0.2)
    assert watch.due(ROUTE) is None
    for _ in range(10):
        router.drift.record(ROUTE, "v1", 0.9)
    assert watch.due(ROUTE) is None  # 10 of 20 above: 0.5 is not above max_ood_share 0.5
    router.drift.record(ROUTE, "v1", 0.9)
    assert "ood_share 0.550" in watch.due(ROUTE)

    watch.record_retrain(ROUTE, watch.due(ROUTE), new_examples=7)
    assert watch.retrains[ROUTE] == 1
    for _ in range(10):  # a fresh window's worth of evidence, still drifting ...
        router.drift.record(ROUTE, "v1", 0.9)
    assert watch.due(ROUTE) is None  # ... but within cooldown_minutes
    clock.now += 11 * 60
    assert watch.due(ROUTE) is not None

    watch.record_retrain(ROUTE, watch.due(ROUTE), new_examples=7)
    clock.now += 11 * 60
    assert watch.due(ROUTE) is None  # the cooldown is over, but no fresh window of evidence yet
    for _ in range(9):
        router.drift.record(ROUTE, "v1", 0.9)
    assert watch.due(ROUTE) is None
    router.drift.record(ROUTE, "v1", 0.9)  # min_requests (10) scores since the last trigger
    assert watch.due(ROUTE) is not None

    # The last drift retrain is audited, so a restarted gateway still cools down from it.
    clock.now = time.time()  # the audit log stamps its rows with the real time
    watch.record_retrain(ROUTE, "third", new_examples=7)
    for _ in range(10):
        router.drift.record(ROUTE, "v1", 0.9)
    restarted = DriftWatch(settings, routes, router, store, clock=clock)
    assert restarted.last_retrain[ROUTE]["reason"] == "third" and restarted.due(ROUTE) is None
    clock.now += 11 * 60
    assert restarted.due(ROUTE) is not None

    # The live threshold is read each time: an operator who raises it ends the drift.
    routes.update(ROUTE, {"ood_threshold": 0.95}, "test")
    assert restarted.due(ROUTE) is None and restarted.status(ROUTE)["ood_share"] == 0.0


def test_the_novel_share_triggers_and_the_status_says_why(tmp_path: Path) -> None:
    settings, store, routes = watch_parts(tmp_path, max_novel_share=0.2)
    router = WindowRouter(train_p95=0.3)
    watch = DriftWatch(settings, routes, router, store)
    for score in [0.35] * 5 + [0.1] * 15:  # none above the threshold, 25 % above the training p95
        router.drift.record(ROUTE, "v1", score)
    status = watch.status(ROUTE)
    assert status["ood_share"] == 0.0 and status["novel_share"] == 0.25
    assert status["expected_novel_share"] == EXPECTED_NOVEL_SHARE
    assert "novel_share 0.250 > max_novel_share 0.200" in status["drift_reason"]
    assert status["config"]["window"] == 20 and status["last_retrain"] is None


def test_without_a_scoring_router_nothing_is_tracked(tmp_path: Path) -> None:
    settings, store, routes = watch_parts(tmp_path, max_ood_share=0.1)
    watch = DriftWatch(settings, routes, object(), store)
    assert watch.due(ROUTE) is None and watch.status(ROUTE)["tracked"] is False
