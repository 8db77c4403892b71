"""Each student version's own cascade threshold: calibrated on the holdout, judged out of fold,
weighed by the teacher's answers to the nearest training prompts, and served by the gateway."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from core.answers import answer_hash
from core.config import parse_settings
from core.store import SQLiteStore
from gateway.route_table import RouteState, StudentPointer, calibrated_threshold
from router.ood import KNNDetector, load_detector
from router.uncertainty import cascade_score, penalised
from trainer.cascade import calibrate_threshold, cross_fitted


def test_the_threshold_is_the_lowest_score_that_still_meets_the_target() -> None:
    scores = [-0.01, -0.02, -0.03, -0.04, -0.5, -0.6]
    agrees = [True, True, True, False, True, False]
    assert calibrate_threshold(scores, agrees, 0.75) == -0.5  # 4 of 5 served agree
    assert calibrate_threshold(scores, agrees, 0.9) == -0.03  # 3 of 3
    assert calibrate_threshold(scores, [False] * 6, 0.5) is None  # nothing is good enough


def test_a_calibration_confidence_asks_the_bound_not_the_point_estimate_to_reach_the_target() -> None:
    # 40 answers ranked by score: the first 20 all agree, then every fourth disagrees. The
    # point estimate reaches 0.95 down to 24 served (23/24 = 0.958); the 75 % lower bound of
    # 20/20 is only 0.933 and of 23/24 0.892, so at 0.95 the bound serves nothing.
    scores = [float(-i) for i in range(40)]
    agrees = [i < 20 or i % 4 != 0 for i in range(40)]
    assert calibrate_threshold(scores, agrees, 0.95) == -23.0
    assert calibrate_threshold(scores, agrees, 0.95, confidence=0.75) is None
    assert calibrate_threshold(scores, agrees, 0.9) == -31.0  # 29/32 = 0.906
    assert calibrate_threshold(scores, agrees, 0.9, confidence=0.75) == -19.0  # 20/20 (0.933), not 23/24 (0.892)
    # With more evidence the bound serves too, just fewer answers than the point estimate.
    many = [float(-i) for i in range(400)]
    clean = [i < 300 or i % 2 == 0 for i in range(400)]
    assert calibrate_threshold(many, clean, 0.95) == -332.0
    assert calibrate_threshold(many, clean, 0.95, confidence=0.75) == -326.0


def test_tied_scores_are_served_together() -> None:
    # -0.1 alone would be 1/1, but its tie partner disagrees: the cut can only fall after both.
    assert calibrate_threshold([-0.1, -0.1, -0.2], [True, False, True], 0.9) is None
    assert calibrate_threshold([-0.1, -0.1, -0.2], [True, False, True], 0.6) == -0.2


def test_cross_fitting_never_judges_a_threshold_on_its_own_answers() -> None:
    # Two answers, one per fold: each fold's threshold is applied only to the other's answer.
    # In sample, a right answer would always pass its own threshold; out of fold it need not,
    # and a wrong answer scored above the other fold's cut is served (and counted against).
    right_above_wrong = cross_fitted([-0.1, -0.2], [True, False], target=0.9, seed="r:v1")
    assert right_above_wrong.threshold == -0.1 and right_above_wrong.served == []
    wrong_above_right = cross_fitted([-0.2, -0.1], [True, False], target=0.9, seed="r:v1")
    assert wrong_above_right.threshold is None and wrong_above_right.served == [1]
    scores, agrees = [float(-i) for i in range(40)], [i % 10 != 3 for i in range(40)]
    assert cross_fitted(scores, agrees, 0.95, "r:v1") == cross_fitted(scores, agrees, 0.95, "r:v1")  # seeded


def test_dissenting_neighbours_lower_the_score() -> None:
    same, other = answer_hash("Balance"), answer_hash("transfer")
    assert answer_hash(" balance. ") == same  # hashed after the one normaliser
    assert penalised(-0.01, "balance", (same,) * 5, 0.5) == -0.01
    assert penalised(-0.01, "balance", (same, same, same, other, other), 0.5) == pytest.approx(-0.21)
    assert penalised(-0.01, "balance", (), 0.5) == -0.01  # no neighbours kept: the logprob alone
    logprobs = {"content": [{"token": "balance", "logprob": -0.02}]}
    assert cascade_score(logprobs, "balance", (other,) * 5, 1.0) == pytest.approx(-1.02)
    assert cascade_score(None, "balance", (same,), 1.0) is None


def test_the_knn_detector_returns_its_neighbours_answers(tmp_path: Any) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)).astype(np.float32)
    embeddings = np.concatenate([centre + 0.05 * rng.normal(size=(10, 16)) for centre in centres])
    answers = [answer_hash(name) for name in ("a", "b", "c") for _ in range(10)]
    detector = KNNDetector(dims=8).fit(embeddings)
    detector.attach_answers(answers, vote_k=5)
    scores, nearest = detector.score_with_neighbours(centres)
    assert np.allclose(scores, detector.score(centres))
    assert nearest is not None and nearest.shape == (3, 5)
    assert [set(row.tolist()) for row in nearest] == [{answer_hash(name)} for name in ("a", "b", "c")]
    restored = load_detector(detector.save(tmp_path / "detector"))
    assert np.array_equal(restored.score_with_neighbours(centres)[1], nearest)
    assert KNNDetector(dims=8).fit(embeddings).score_with_neighbours(centres)[1] is None


def _route_state(target: float | None, overrides: dict[str, Any] | None = None) -> RouteState:
    settings = parse_settings({"routes": [{"name": "r", "teacher": {"model": "openai/x"},
                                           "confidence_threshold": -0.01,
                                           "cascade": {"target_agreement": target}}]})
    return RouteState(settings.routes[0], overrides or {})


def test_a_calibrated_route_serves_each_version_at_its_own_threshold() -> None:
    metrics = {"candidate": {"confidence_threshold": -0.3}}
    assert calibrated_threshold(metrics) == -0.3 and calibrated_threshold({}) is None
    state = _route_state(0.95)
    assert state.policy().confidence_threshold == -0.01  # no version yet: the configured fallback
    state.student = StudentPointer("v2", "r@v2", calibrated_threshold(metrics))
    assert state.policy().confidence_threshold == -0.3
    assert _route_state(0.95, {"confidence_threshold": -0.05}).policy().confidence_threshold == -0.05
    fixed = _route_state(None)  # no target: the configured threshold whatever the version says
    fixed.student = StudentPointer("v2", "r@v2", -0.3)
    assert fixed.policy().confidence_threshold == -0.01


def test_calibration_target_below_the_gate_is_refused() -> None:
    from core.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="target_agreement"):
        parse_settings({"routes": [{"name": "r", "teacher": {"model": "openai/x"},
                                    "cascade": {"target_agreement": 0.8},
                                    "gate": {"metric": "served_agreement", "minimum": 0.9}}]})


def test_the_trainer_keeps_answers_in_the_detector_only_when_they_vote(tmp_path: Any) -> None:
    from types import SimpleNamespace

    from trainer.pipeline import Trainer

    class Embedder:
        id, dim = "test", 4

        def encode(self, texts: list[str]) -> np.ndarray:
            return np.array([[len(text), text.count("a"), text.count("e"), 1.0] for text in texts], dtype=np.float32)

    examples = [SimpleNamespace(prompt_text=f"{'a' * i} {'e' * (i % 3)}", answer=f"label{i % 2}") for i in range(12)]
    holdout = [SimpleNamespace(prompt_text="aaa e", answer="label1")]
    for penalty, kept in ((0.5, True), (0.0, False)):
        settings = parse_settings({"store": {"path": str(tmp_path / "db.sqlite")},
                                   "routes": [{"name": "r", "teacher": {"model": "openai/x"},
                                               "cascade": {"disagreement_penalty": penalty, "neighbours": 3}}]})
        store = SQLiteStore(settings.store.path)
        trainer = Trainer(settings, store, progress=False, embedder_factory=Embedder)
        dataset = SimpleNamespace(train=examples, holdout=holdout)
        path = trainer._fit_detector(settings.routes[0], dataset, tmp_path / f"detector-{penalty}")
        neighbours = trainer.neighbours(settings.routes[0], holdout, path)
        store.close()
        assert (load_detector(path).answer_hashes is not None) is kept
        if kept:
            assert neighbours is not None and len(neighbours) == 1 and len(neighbours[0]) == 3
            assert set(neighbours[0]) <= {answer_hash("label0"), answer_hash("label1")}
        else:
            assert neighbours is None


def test_an_answer_the_route_escalates_is_never_served_by_the_calibrated_threshold() -> None:
    from trainer.dataset import Example
    from trainer.evaluate import _add_served, score_answers

    # The teacher said "oos" too, so the escalated answer agrees: a threshold low enough to take
    # it would look free. It must not be a cut point, nor counted as served.
    assert calibrate_threshold([-0.01, -0.02, float("-inf")], [True, True, True], 0.9) == -0.02
    teacher = ["balance", "transfer", "oos", "balance"]
    student = ["balance", "transfer", "OOS", "transfer"]
    holdout = [Example([{"role": "user", "content": f"q{i}"}], answer, f"q{i}") for i, answer in enumerate(teacher)]
    cascade = parse_settings({"routes": [{"name": "r", "teacher": {"model": "openai/t"},
                                          "student": {"system_prompt": "Intent:"},
                                          "cascade": {"target_agreement": 0.6, "escalate_answers": ["oos"]}}]}
                             ).routes[0].cascade
    result = score_answers(holdout, student, None, 0.0)
    _add_served(result, holdout, student, [-0.1, -0.2, -0.01, -0.3], None, None, cascade, None, "r:v1")
    assert result.cascade_scores[2] == float("-inf")
    assert result.confidence_threshold == -0.3  # 2 of 3 agree; the sure "oos" is not among them
    plain = score_answers(holdout, student, None, 0.0)
    _add_served(plain, holdout, student, [-0.1, -0.2, -0.01, -0.3], None, None,
                cascade.model_copy(update={"escalate_answers": []}), None, "r:v1")
    assert plain.cascade_scores[2] == -0.01  # without the rule it is the surest answer of all


def test_the_trainer_masks_prompts_the_teacher_answered_out_of_scope(tmp_path: Any) -> None:
    """A route's escalate answers mark prompts the student must hand back: they vote in the
    detector's bank, but an out-of-scope prompt near them is not scored as known."""
    from types import SimpleNamespace

    from trainer.pipeline import Trainer

    class Embedder:
        id, dim = "test", 3

        def encode(self, texts: list[str]) -> np.ndarray:
            return np.array([[text.count("a"), text.count("z"), 1.0] for text in texts], dtype=np.float32)

    examples = [SimpleNamespace(prompt_text="a" * i, answer=f"label{i % 2}") for i in range(1, 11)]
    examples += [SimpleNamespace(prompt_text="z" * i, answer="OOS") for i in range(1, 4)]
    paths = {}
    for mask in (False, True):  # off by default: the route's escalate answers are scored too
        cascade = {"disagreement_penalty": 0.5, "neighbours": 1, "escalate_answers": ["oos"]}
        settings = parse_settings({"store": {"path": str(tmp_path / "db.sqlite")},
                                   "routes": [{"name": "r", "teacher": {"model": "openai/x"},
                                               "cascade": {**cascade, "mask_escalated_prompts": True} if mask
                                               else cascade}]})
        store = SQLiteStore(settings.store.path)
        trainer = Trainer(settings, store, progress=False, embedder_factory=Embedder)
        paths[mask] = trainer._fit_detector(settings.routes[0], SimpleNamespace(train=examples),
                                            tmp_path / f"detector-{mask}")
        store.close()
    masked, in_bank = load_detector(paths[True]), load_detector(paths[False])
    assert masked.meta["unscored_rows"] == 3 and in_bank.meta["unscored_rows"] == 0
    probe = Embedder().encode(["zz"])
    assert in_bank.score(probe)[0] < 1e-6 < masked.score(probe)[0]
    assert masked.score_with_neighbours(probe)[1][0, 0] == answer_hash("oos")
