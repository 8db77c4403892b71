"""OODRouter.decide: modes, cold start, threshold, cascade, shadow, hot swap, batching."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.config import parse_settings
from core.modes import Mode
from core.store import SQLiteStore
from router.decision import RoutePolicy
from router.embeddings import Embedder
from router.learned import LearnedRouter
from router.ood import create_detector
from router.ood_router import OODRouter, build_ood_router


class LengthModel:
    """Fake sentence encoder: the embedding encodes the text's length, so scores are predictable."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def encode(self, texts: list[str], **_: Any) -> np.ndarray:
        self.calls.append(len(texts))
        rows = np.zeros((len(texts), 384), dtype=np.float32)
        rows[:, 0] = [len(text) for text in texts]
        rows[:, 1] = 1.0
        return rows


class LengthDetector:
    """Scores a prompt by its length in tens of characters (column 0 of the fake embedding)."""

    name = "length"
    meta: dict[str, Any] = {}

    def fit(self, embeddings: np.ndarray, labels: Any = None) -> LengthDetector:
        return self

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        return np.asarray(embeddings)[:, 0] / 10.0

    def save(self, path: str | Path) -> Path:
        raise NotImplementedError


def policy(mode: Mode = Mode.auto, threshold: float = 1.0, confidence: float | None = None,
           shadow_rate: float = 0.0, version: str | None = "v1") -> RoutePolicy:
    return RoutePolicy("r", mode, threshold, confidence, shadow_rate, version)


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "long app prompt " * 20}, {"role": "user", "content": text}]


@pytest.fixture
def router() -> OODRouter:
    router = OODRouter(Embedder(model=LengthModel(), cache_bytes=0), seed=0)
    router.set_detector("r", "v1", LengthDetector())
    yield router
    router.close()


async def test_in_distribution_goes_to_student_and_ood_to_teacher(router: OODRouter) -> None:
    near = await router.decide(policy(threshold=1.0), user("short"))  # score 0.5
    far = await router.decide(policy(threshold=1.0), user("a much longer and stranger prompt"))
    assert (near.target, near.score) == ("student", pytest.approx(0.5))
    assert far.target == "teacher" and far.score > 1.0
    assert "> ood_threshold" in far.reasons[0] and "<= ood_threshold" in near.reasons[0]
    assert not near.cascade and not near.shadow


async def test_threshold_change_is_effective_on_the_next_request(router: OODRouter) -> None:
    assert (await router.decide(policy(threshold=1.0), user("x" * 15))).target == "teacher"
    assert (await router.decide(policy(threshold=2.0), user("x" * 15))).target == "student"


@pytest.mark.parametrize(("mode", "target", "shadow"), [
    (Mode.teacher_only, "teacher", False), (Mode.student_only, "student", False), (Mode.shadow, "teacher", True)])
async def test_modes_override_the_score(router: OODRouter, mode: Mode, target: str, shadow: bool) -> None:
    decision = await router.decide(policy(mode=mode, threshold=0.0), user("x" * 40))
    assert decision.target == target and decision.shadow is shadow
    assert f"mode={mode.value}" in decision.reasons[0]


async def test_shadow_mode_still_records_the_score_for_calibration(router: OODRouter) -> None:
    decision = await router.decide(policy(mode=Mode.shadow), user("hello"))
    assert decision.score == pytest.approx(0.5)


async def test_cold_start_and_missing_detector(router: OODRouter) -> None:
    cold = await router.decide(policy(version=None), user("hi"))
    assert cold.target == "teacher" and "cold_start" in cold.reasons[0]
    unfitted = await router.decide(policy(version="v9"), user("hi"))
    assert unfitted.target == "student" and unfitted.score is None


async def test_empty_user_text_goes_to_teacher(router: OODRouter) -> None:
    decision = await router.decide(policy(), [{"role": "system", "content": "only a system prompt"}])
    assert decision.target == "teacher" and "no user text" in decision.reasons[0]


async def test_cascade_and_shadow_flags_for_student_served_requests(router: OODRouter) -> None:
    decision = await router.decide(policy(confidence=-0.5, shadow_rate=1.0), user("hi"))
    assert decision.target == "student" and decision.cascade and decision.shadow
    teacher = await router.decide(policy(confidence=-0.5, shadow_rate=1.0, threshold=0.0), user("hi"))
    assert not teacher.cascade and not teacher.shadow  # the teacher serves: nothing to cascade or shadow


async def test_shadow_rate_samples_about_that_share(router: OODRouter) -> None:
    decisions = [await router.decide(policy(shadow_rate=0.25), user("hi")) for _ in range(400)]
    assert 60 <= sum(d.shadow for d in decisions) <= 140


async def test_hot_swap_uses_the_new_versions_detector(router: OODRouter) -> None:
    class Strict(LengthDetector):
        def score(self, embeddings: np.ndarray) -> np.ndarray:
            return np.full(len(embeddings), 9.0)

    router.set_detector("r", "v2", Strict())
    assert (await router.decide(policy(version="v1"), user("hi"))).target == "student"
    assert (await router.decide(policy(version="v2"), user("hi"))).target == "teacher"
    router.drop_detector("r", "v1")
    assert (await router.decide(policy(version="v1"), user("hi"))).score is None


async def test_concurrent_decisions_share_batches(router: OODRouter) -> None:
    model = router.embedder.model
    decisions = await asyncio.gather(*(router.decide(policy(), user(f"q{n}")) for n in range(64)))
    assert len(decisions) == 64 and all(d.target == "student" for d in decisions)
    assert len(model.calls) <= 3  # 64 requests, not 64 forward passes


async def test_learned_router_can_veto_the_student(router: OODRouter) -> None:
    learned = LearnedRouter()
    learned.coef = np.zeros(385, dtype=np.float32)
    learned.intercept = -3.0  # predicts disagreement everywhere
    router.set_learned("r", "v1", learned)
    enabled = RoutePolicy("r", Mode.auto, 1.0, None, 0.0, "v1", learned_min_agree=0.5)
    decision = await router.decide(enabled, user("hi"))
    assert decision.target == "teacher" and decision.extra["p_agree"] < 0.5
    assert "learned p_agree 0.047 < 0.500" in decision.reasons
    assert (await router.decide(policy(), user("hi"))).target == "student"  # not enabled for the route
    router.set_learned("r", "v1", None)
    assert (await router.decide(enabled, user("hi"))).target == "student"


def test_build_ood_router_loads_the_live_versions_detector(tmp_path: Path) -> None:
    settings = parse_settings({"store": {"path": str(tmp_path / "db.sqlite")},
                               "routes": [{"name": "r", "teacher": {"model": "openai/x"}}]})
    store = SQLiteStore(settings.store.path)
    rng = np.random.default_rng(0)
    saved = create_detector("knn").fit(rng.normal(size=(50, 384)).astype(np.float32)).save(tmp_path / "v1")
    store.upsert_version({"route": "r", "version": "v1", "status": "candidate", "detector_path": str(saved)})
    store.set_live_version("r", "v1")
    router = build_ood_router(settings, store, embedder=Embedder(model=LengthModel()))
    assert router.detector("r", "v1") is not None and router.detector("r", "v2") is None
    router.close()
    store.close()


async def test_decisions_carry_the_nearest_training_prompts_answers() -> None:
    from core.answers import answer_hash
    from router.ood import KNNDetector

    model = LengthModel()
    texts = ["aa", "aaa", "aaaa", "a" * 40, "a" * 41, "a" * 42]
    detector = KNNDetector(dims=2, use_centroids=False).fit(model.encode(texts))
    detector.attach_answers([answer_hash(answer) for answer in ["short"] * 3 + ["long"] * 3], vote_k=3)
    router = OODRouter(Embedder(model=model, cache_bytes=0), seed=0)
    router.set_detector("r", "v1", detector)
    try:
        short = await router.decide(policy(threshold=2.0), user("aaa"))
        long = await router.decide(policy(threshold=2.0), user("a" * 41))
    finally:
        router.close()
    assert short.neighbour_answers == (answer_hash("short"),) * 3
    assert long.neighbour_answers == (answer_hash("long"),) * 3
