"""``knn_tuned`` (router/tuned.py): the static token table tuned to a route's labels at training time.

The static embedder is built from the packaged MiniLM into ``var/models/router`` (as in
tests/test_router_embedders.py). Tuning runs torch on a few hundred CLINC150 prompts: seconds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openai
import pytest

from core.config import Settings, parse_settings
from core.config_base import ConfigError
from router.artifacts import create_embedder, ensure_embedder
from router.eval_ood import near_ood, ood_metrics
from router.ood import (
    EmbedderMismatch,
    create_detector,
    fit_detector_for_texts,
    load_detector,
    save_detector,
)
from router.ood_router import OODRouter
from router.tuned import TUNE_MAX_EPOCHS, _supcon, detector_embeddings, epochs_for
from tests.helpers import CLINC, ROOT, UvicornThread

ARTIFACTS = ROOT / "var" / "models" / "router"


def router_config(kind: str) -> object:
    return parse_settings({"router": {"embedder": kind, "artifacts_dir": str(ARTIFACTS), "cache_mb": 1.0},
                           "routes": [{"name": "r", "teacher": {"model": "openai/x"}}]}).router


@pytest.fixture(scope="module")
def static() -> object:
    ensure_embedder("static", ARTIFACTS)
    return create_embedder(router_config("static"), cache_bytes=0)


@pytest.fixture(scope="module")
def clinc() -> dict[str, list[tuple[str, str]]]:
    """30 intents of CLINC150, 40 train prompts each, their test prompts and 200 out-of-scope ones."""
    data = json.loads(CLINC.read_text())
    intents = set(sorted({intent for _, intent in data["train"]})[::5])
    train = [row for row in data["train"] if row[1] in intents]
    train = [row for n, row in enumerate(train) if n % 5 < 2]
    return {"train": [tuple(row) for row in train], "test": [tuple(row) for row in data["test"] if row[1] in intents],
            "oos": [tuple(row) for row in data["oos_test"][:200]]}


def texts_labels(rows: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    return [text for text, _ in rows], [intent for _, intent in rows]


def test_fit_is_deterministic_and_round_trips(static: object, clinc: dict, tmp_path: Path) -> None:
    texts, labels = texts_labels(clinc["train"])
    first = load_detector(fit_detector_for_texts(texts, labels, "knn_tuned", tmp_path / "a", static))
    second = load_detector(fit_detector_for_texts(texts, labels, "knn_tuned", tmp_path / "b", static))
    assert first.name == "knn_tuned" and first.meta["tuned_tokens"] == len(first.tuned_ids) > 100
    for name, array in first.arrays().items():
        np.testing.assert_array_equal(array, second.arrays()[name], err_msg=name)
    base = static.encoder.vectors[first.tuned_ids]
    assert np.abs(first.tuned_rows - base).max() > 0.01  # the rows did move
    probe = [text for text, _ in clinc["oos"][:20]]
    np.testing.assert_array_equal(first.score(detector_embeddings(first, static, probe)),
                                  second.score(detector_embeddings(second, static, probe)))


def test_tuning_separates_held_out_intents_better_than_knn(static: object, clinc: dict) -> None:
    """Near-OOD (6 of 30 intents held out, tuned on the other 24 only): tuned beats plain knn."""
    train_x = static.encode([text for text, _ in clinc["train"]])
    test_x = static.encode([text for text, _ in clinc["test"]])
    figures = {kind: near_ood(clinc["train"], train_x, clinc["test"], test_x, kind, [0], 0.2, static)["mean"]["auroc"]
               for kind in ("knn", "knn_tuned")}
    assert figures["knn_tuned"] > figures["knn"] + 0.01, figures


def test_without_labels_it_is_knn(static: object, clinc: dict) -> None:
    texts, _ = texts_labels(clinc["train"])
    tuned = create_detector("knn_tuned").fit_texts(texts, None, static)
    plain = create_detector("knn").fit(static.encode(texts))
    assert len(tuned.tuned_ids) == 0
    probe = [text for text, _ in clinc["oos"][:20] + clinc["test"][:20]]
    np.testing.assert_allclose(tuned.score(tuned.embed_texts(probe)), plain.score(static.encode(probe)), atol=1e-5)


def test_the_router_scores_with_the_tuned_table(static: object, clinc: dict, tmp_path: Path) -> None:
    texts, labels = texts_labels(clinc["train"])
    path = fit_detector_for_texts(texts, labels, "knn_tuned", tmp_path / "det", static)
    router = OODRouter(static)
    router.load_detector("r", "v1", path)
    detector = router.detector("r", "v1")
    probe = [text for text, _ in clinc["test"][:8] + clinc["oos"][:8]]
    results = router._score_batch([(detector, text) for text in probe])
    scores = np.array([score for score, _, _, _ in results])
    np.testing.assert_allclose(scores, detector.score(detector.embed_texts(probe)), atol=1e-6)
    untuned = detector.score(static.encode(probe))  # what the shared embedding alone would score
    assert np.abs(scores - untuned).max() > 0.01
    np.testing.assert_allclose(np.stack([row for _, row, _, _ in results]), static.encode(probe), atol=1e-6)
    in_scores, oos_scores = scores[:8], scores[8:]
    assert ood_metrics(in_scores, oos_scores)["auroc"] > 0.9
    router.close()


def test_another_embedder_or_a_foreign_table_is_refused(static: object, clinc: dict, tmp_path: Path) -> None:
    texts, labels = texts_labels(clinc["train"][:200])
    path = fit_detector_for_texts(texts, labels, "knn_tuned", tmp_path / "det", static)
    ensure_embedder("onnx", ARTIFACTS)
    onnx = create_embedder(router_config("onnx"))
    with pytest.raises(EmbedderMismatch, match=static.id):
        OODRouter(onnx).load_detector("r", "v1", path)
    detector = load_detector(path)
    with pytest.raises(EmbedderMismatch, match="tunes the static embedder's token table"):
        detector.bind(onnx)  # even with the ids check bypassed, an onnx encoder has no table to tune
    detector.tuned_ids = np.array([10**7])
    with pytest.raises(EmbedderMismatch, match="rows name token 10000000"):
        detector.bind(static)


def test_config_accepts_knn_tuned() -> None:
    route = {"name": "r", "teacher": {"model": "openai/x"}}
    labelled = {**route, "labels_dataset": str(CLINC)}
    assert parse_settings({"routes": [{**labelled, "ood_detector": "knn_tuned"}]}).routes[0].ood_detector == "knn_tuned"
    # Without labels it would be knn at a threshold chosen for knn_tuned's shorter distances.
    for kind in ("knn_tuned", "knn_lda"):
        with pytest.raises(ConfigError, match=f"ood_detector {kind} learns from the teacher's labels"):
            parse_settings({"routes": [{**route, "ood_detector": kind}]})
    with pytest.raises(ConfigError, match="ood_detector"):
        parse_settings({"routes": [{**route, "ood_detector": "tuned"}]})


def test_the_starting_threshold_is_read_on_prompts_the_table_was_not_tuned_on(static: object, clinc: dict) -> None:
    """The tuned table fits its own prompts: their percentile would start the threshold (and drift's
    novel line) too low, sending many new in-scope prompts to the teacher."""
    texts, labels = texts_labels(clinc["train"])
    detector = create_detector("knn_tuned").fit_texts(texts, labels, static)
    assert detector.meta["calibration_prompts"] == round(len(texts) * 0.1)
    in_sample = float(np.quantile(detector._held_out_scores(detector.embed_texts(texts)), 0.95))
    test_scores = detector.score(detector.embed_texts([text for text, _ in clinc["test"]]))
    above = {"held_out": float((test_scores > detector.meta["threshold_keep_95"]).mean()),
             "in_sample": float((test_scores > in_sample).mean())}
    assert detector.meta["threshold_keep_95"] > in_sample
    assert above["held_out"] < 0.12 < above["in_sample"], above  # measured: 0.054 and 0.173


async def test_each_version_is_scored_with_its_own_table(static: object, clinc: dict, tmp_path: Path) -> None:
    """What the hot swap does: the new version's detector (and table) is loaded beside the old one."""
    from core.modes import Mode
    from router.decision import RoutePolicy

    texts, labels = texts_labels(clinc["train"])
    first = [n for n, label in enumerate(labels) if label in sorted(set(labels))[:15]]
    v1 = fit_detector_for_texts([texts[n] for n in first], [labels[n] for n in first], "knn_tuned",
                                tmp_path / "v1", static)
    v2 = fit_detector_for_texts(texts, labels, "knn_tuned", tmp_path / "v2", static)
    router = OODRouter(static)
    for version, path in (("v1", v1), ("v2", v2)):
        await router.aload_detector("r", version, path)
    prompt = [{"role": "user", "content": clinc["test"][-1][0]}]  # an intent only v2 was tuned on
    scores = {version: (await router.decide(RoutePolicy("r", Mode.auto, 0.5, None, 0.0, version), prompt)).score
              for version in ("v1", "v2")}
    for version in ("v1", "v2"):
        detector = router.detector("r", version)
        assert scores[version] == pytest.approx(float(detector.score(detector.embed_texts([prompt[0]["content"]]))[0]),
                                                abs=1e-6)
    assert scores["v2"] < scores["v1"] - 0.05, scores
    router.drop_detector("r", "v1")
    assert (await router.decide(RoutePolicy("r", Mode.auto, 0.5, None, 0.0, "v2"), prompt)).score == scores["v2"]
    router.close()


def test_the_contrastive_term_pulls_a_label_together() -> None:
    """The loss the tuning adds: lower when prompts of a label sit together than when they are mixed."""
    import torch

    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16))
    together = torch.nn.functional.normalize(torch.tensor(centres[[0, 0, 1, 1, 2, 2]] + 0.05 * rng.normal(size=(6, 16)),
                                                          dtype=torch.float32), dim=1)
    mixed = together[[0, 2, 4, 1, 3, 5]]
    assert float(_supcon(together, labels)) < float(_supcon(mixed, labels)) - 1.0
    assert float(_supcon(together, torch.tensor([0, 1, 2, 3, 4, 5]))) == 0.0  # no positives: no term


def test_a_small_route_gets_enough_steps() -> None:
    assert epochs_for(13_500, 3, 512) == 3  # CLINC150's full train set: 27 steps an epoch already
    assert epochs_for(2_700, 3, 512) == 9  # 6 an epoch: raised toward 50 steps
    assert epochs_for(300, 3, 512) == TUNE_MAX_EPOCHS  # capped: a tiny route is not tuned for long


def test_the_file_records_the_objective_and_older_files_read_without_it(static: object, clinc: dict,
                                                                        tmp_path: Path) -> None:
    texts, labels = texts_labels(clinc["train"])
    contrastive = create_detector("knn_tuned").fit_texts(texts, labels, static)
    plain = create_detector("knn_tuned", contrast=0.0, batch_size=128).fit_texts(texts, labels, static)
    np.testing.assert_array_equal(contrastive.tuned_ids, plain.tuned_ids)
    assert np.abs(contrastive.tuned_rows - plain.tuned_rows).max() > 0.01  # the term changes the table
    loaded = load_detector(save_detector(contrastive, tmp_path / "new"))
    assert (loaded.contrast, loaded.batch_size) == (1.0, 512)
    older = create_detector("knn_tuned")
    older.restore(plain.arrays(), {key: value for key, value in plain.params().items()
                                   if key not in ("contrast", "batch_size")})
    assert (older.contrast, older.batch_size) == (0.0, 128)  # what a file from before the term was tuned with


@pytest.mark.integration
def test_a_real_gateway_decides_with_the_contrastive_table(
        static: object, clinc: dict, replay_teacher: str, make_settings: Callable[..., Settings],
        tmp_path: Path) -> None:
    """Through uvicorn and the openai SDK: the served score is the contrastive table's, not the
    cross-entropy-only table's nor the shared embedding's, and routes in- and out-of-scope apart."""
    from gateway.app import create_app

    texts, labels = texts_labels(clinc["train"])
    settings = make_settings(replay_teacher, replay_teacher, route={"student": {"serve_base_model": True}},
                             router={"embedder": "static", "artifacts_dir": str(ARTIFACTS)})
    path = fit_detector_for_texts(texts, labels, "knn_tuned", tmp_path / "detector", create_embedder(settings.router))
    plain = create_detector("knn_tuned", contrast=0.0, batch_size=128).fit_texts(texts, labels, static)
    prompts = {"in": clinc["test"][0][0], "out": clinc["oos"][0][0]}
    app = create_app(settings)
    with UvicornThread(app) as server:
        app.state.decider.load_detector("clinc-intents", "base", path)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        served = {}
        for name, text in prompts.items():
            raw = client.chat.completions.with_raw_response.create(
                model="clinc-intents", messages=[{"role": "user", "content": text}], max_tokens=8)
            served[name] = (raw.headers["x-distillgate-target"], float(raw.headers["x-distillgate-ood-score"]))
    detector = app.state.decider.detector("clinc-intents", "base")
    assert detector.name == "knn_tuned" and detector.contrast == 1.0
    threshold = detector.meta["threshold_keep_95"]
    assert served["in"][0] == "student" and served["in"][1] <= threshold, served
    assert served["out"][0] == "teacher" and served["out"][1] > threshold, served
    for name, text in prompts.items():
        assert served[name][1] == pytest.approx(float(detector.score(detector.embed_texts([text]))[0]), abs=1e-3)
        assert abs(served[name][1] - float(plain.score(plain.embed_texts([text]))[0])) > 1e-3


def test_prompts_answered_out_of_scope_only_vote(static: object, clinc: dict) -> None:
    """Masked prompts (the trainer masks the route's escalate answers) are neither tuned on nor
    scored against: the detector scores as if they were absent, and they still vote."""
    from core.answers import answer_hash

    texts, labels = texts_labels(clinc["train"])
    oos = [text for text, _ in clinc["oos"][:60]]
    mixed_texts = [text for pair in zip(texts[:60], oos, strict=True) for text in pair] + texts[60:]
    mixed_labels = [label for pair in zip(labels[:60], ["oos"] * 60, strict=True) for label in pair] + labels[60:]
    scored = [label != "oos" for label in mixed_labels]
    masked = create_detector("knn_tuned").fit_texts(mixed_texts, mixed_labels, static, scored=scored)
    masked.attach_answers([answer_hash(label) for label in mixed_labels], vote_k=1)
    absent = create_detector("knn_tuned").fit_texts(texts, labels, static)
    in_bank = create_detector("knn_tuned").fit_texts(mixed_texts, mixed_labels, static)

    np.testing.assert_array_equal(masked.tuned_rows, absent.tuned_rows)  # the tuning never saw them
    probe = oos + [text for text, _ in clinc["test"][:40]]
    np.testing.assert_allclose(masked.score(masked.embed_texts(probe)), absent.score(absent.embed_texts(probe)),
                               atol=1e-5)
    assert masked.meta["threshold_keep_95"] == pytest.approx(absent.meta["threshold_keep_95"], abs=1e-6)
    assert (in_bank.score(in_bank.embed_texts(oos)) < masked.score(masked.embed_texts(oos))).all()
    _, nearest = masked.score_with_neighbours(masked.embed_texts(oos))
    assert (nearest[:, 0] == answer_hash("oos")).all()


async def test_the_router_sends_known_out_of_scope_prompts_away_and_drift_reads_them_as_seen(
        static: object, clinc: dict, tmp_path: Path) -> None:
    """Through a real router: a prompt the teacher answered out of scope is scored as far (the
    mask), while the drift window records it as seen (the novelty)."""
    from core.modes import Mode
    from router.decision import RoutePolicy

    texts, labels = texts_labels(clinc["train"])
    oos = [text for text, _ in clinc["oos"][:50]]
    path = fit_detector_for_texts(texts + oos, labels + ["oos"] * len(oos), "knn_tuned", tmp_path / "det", static,
                                  scored=[True] * len(texts) + [False] * len(oos))
    router = OODRouter(static)
    router.load_detector("r", "v1", path)
    policy = RoutePolicy("r", Mode.auto, 0.39, None, 0.0, "v1")
    try:
        decisions = [await router.decide(policy, [{"role": "user", "content": text}]) for text in oos]
        stats = router.drift_stats("r", 0.39)
    finally:
        router.close()
    scores = np.array([decision.score for decision in decisions])
    assert sum(decision.target == "teacher" for decision in decisions) >= 0.6 * len(oos)
    # The novelty still has the distance to the nearest in-scope centroid in it (measured: 0.29
    # against a score of 0.57; a fifth of the window above the percentile, against nearly all).
    assert stats.requests == len(oos) and stats.mean_score < 0.7 * scores.mean()
    assert stats.novel_share < 0.3 and float((scores > stats.train_p95).mean()) > 0.8
