"""The router's embedders: each through a real gateway, the mismatch refusal, the byte-capped cache.

The static and onnx embedders are built from the packaged MiniLM into ``var/models/router``
(the same place ``distillgate serve`` builds them; built once per machine, then reused).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openai
import pytest

from core.config import Settings, parse_settings
from core.store import SQLiteStore
from router.artifacts import create_embedder, ensure_embedder
from router.embeddings import Embedder, EmbeddingCache
from router.ood import EmbedderMismatch, fit_detector_for_texts, load_detector
from router.ood_router import OODRouter, build_ood_router
from tests.helpers import CLINC, ROOT, UvicornThread

ARTIFACTS = ROOT / "var" / "models" / "router"
IN_SCOPE = "transfer $20000 from my savings account to checking account"
OUT_OF_SCOPE = "what is the boiling point of tungsten in kelvin"


@pytest.fixture(scope="module")
def built() -> Path:
    for kind in ("static", "onnx"):
        ensure_embedder(kind, ARTIFACTS)
    return ARTIFACTS


def router_config(kind: str, cache_mb: float = 1.0) -> object:
    return parse_settings({"router": {"embedder": kind, "artifacts_dir": str(ARTIFACTS), "cache_mb": cache_mb},
                           "routes": [{"name": "r", "teacher": {"model": "openai/x"}}]}).router


@pytest.fixture(scope="module")
def clinc_train() -> tuple[list[str], list[str]]:
    """Ten intents of CLINC150 train (the transfer intent among them)."""
    rows = json.loads(CLINC.read_text())["train"]
    intents = [*sorted({intent for _, intent in rows})[::15][:9], "transfer"]
    picked = [row for row in rows if row[1] in intents]
    return [text for text, _ in picked], [intent for _, intent in picked]


@pytest.mark.integration
@pytest.mark.parametrize(("kind", "detector"), [("static", "knn"), ("onnx", "knn"), ("minilm", "knn"),
                                               ("static", "knn_lda"), ("static", "knn_tuned")])
def test_every_embedder_gives_decisions_through_a_real_gateway(
        kind: str, detector: str, built: Path, clinc_train: tuple[list[str], list[str]], replay_teacher: str,
        make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    from gateway.app import create_app

    settings = make_settings(replay_teacher, replay_teacher, route={"student": {"serve_base_model": True}},
                             router={"embedder": kind, "artifacts_dir": str(built)})
    # What the trainer does: fit with the embedder the config names.
    path = fit_detector_for_texts(*clinc_train, detector, tmp_path / "detector", create_embedder(settings.router))
    threshold = load_detector(path).meta["threshold_keep_95"]
    app = create_app(settings)
    with UvicornThread(app) as server:
        app.state.decider.load_detector("clinc-intents", "base", path)  # serve_base_model's version
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        targets = {}
        for text in (IN_SCOPE, OUT_OF_SCOPE):
            raw = client.chat.completions.with_raw_response.create(
                model="clinc-intents", messages=[{"role": "user", "content": text}], max_tokens=8)
            targets[text] = (raw.headers["x-distillgate-target"], float(raw.headers["x-distillgate-ood-score"]))
    assert app.state.decider.embedder.id == create_embedder(settings.router).id
    assert app.state.decider.detector("clinc-intents", "base").name == detector
    assert targets[IN_SCOPE][0] == "student" and targets[IN_SCOPE][1] <= threshold
    assert targets[OUT_OF_SCOPE][0] == "teacher" and targets[OUT_OF_SCOPE][1] > threshold
    if detector == "knn_tuned":  # the served score is the tuned table's, not the shared embedding's
        served = app.state.decider.detector("clinc-intents", "base")
        tuned = {text: float(served.score(served.embed_texts([text]))[0]) for text in targets}
        shared = {text: float(served.score(app.state.decider.embedder.encode([text]))[0]) for text in targets}
        assert all(targets[text][1] == pytest.approx(tuned[text], abs=1e-3) for text in targets), (targets, tuned)
        assert any(abs(targets[text][1] - shared[text]) > 0.01 for text in targets), (targets, shared)


def test_a_detector_fitted_by_another_embedder_is_refused(
        built: Path, clinc_train: tuple[list[str], list[str]], tmp_path: Path) -> None:
    static, onnx = create_embedder(router_config("static")), create_embedder(router_config("onnx"))
    texts, labels = clinc_train[0][:200], clinc_train[1][:200]
    path = fit_detector_for_texts(texts, labels, "knn", tmp_path / "v1" / "detector", static)
    router = OODRouter(onnx)
    with pytest.raises(EmbedderMismatch) as refused:
        router.load_detector("r", "v1", path)
    message = str(refused.value)
    assert static.id in message and onnx.id in message and "dim 256" in message and "dim 384" in message
    assert isinstance(refused.value, ValueError)  # the hot swap treats it as a failed smoke test
    assert router.detector("r", "v1") is None
    router.close()
    OODRouter(static).load_detector("r", "v1", path)  # its own embedder takes it


async def test_a_refused_live_detector_sends_auto_traffic_to_the_teacher(
        built: Path, clinc_train: tuple[list[str], list[str]], tmp_path: Path) -> None:
    from core.modes import Mode
    from router.decision import RoutePolicy

    settings = parse_settings({"store": {"path": str(tmp_path / "db.sqlite")},
                               "router": {"embedder": "onnx", "artifacts_dir": str(built)},
                               "routes": [{"name": "r", "teacher": {"model": "openai/x"}}]})
    path = fit_detector_for_texts(clinc_train[0][:200], None, "knn", tmp_path / "det",
                                  create_embedder(router_config("static")))
    store = SQLiteStore(settings.store.path)
    store.upsert_version({"route": "r", "version": "v1", "status": "candidate", "detector_path": str(path)})
    store.set_live_version("r", "v1")
    router = build_ood_router(settings, store)
    decision = await router.decide(RoutePolicy("r", Mode.auto, 9.0, None, 0.0, "v1"),
                                   [{"role": "user", "content": IN_SCOPE}])
    assert decision.target == "teacher" and "refused" in decision.reasons[0]
    router.close()
    store.close()


def test_static_encoder_matches_model2vec(built: Path) -> None:
    from model2vec import StaticModel

    texts = [IN_SCOPE, OUT_OF_SCOPE, "é ü ß 東京 🙂 unknownwordxyzzy", ""]
    ours = create_embedder(router_config("static")).encode_uncached(texts)
    reference = StaticModel.from_pretrained(str(built / "static")).encode(texts[:3])
    reference = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    np.testing.assert_allclose(ours[:3], reference, atol=2e-3)  # model2vec answers in float16
    assert ours.shape == (4, 256) and not ours[3].any()  # empty text: a zero row, scored as far out


@pytest.mark.parametrize("kind", ["static", "onnx"])
def test_cache_byte_cap_holds_under_large_prompts(kind: str, built: Path) -> None:
    cap = 64 * 1024
    embedder = create_embedder(router_config(kind), cache_bytes=cap)
    rng = np.random.default_rng(0)
    words = np.array(["balance", "transfer", "flight", "weather", "account", "pizza", "music", "alarm"])
    for index in range(40):  # 40 prompts of ~1 MB, each different in its first words
        prompt = f"request {index} " + " ".join(rng.choice(words, size=150_000))
        row = embedder.encode([prompt])[0]
        assert embedder.cache.bytes <= cap
    row_bytes = embedder.dim * 4
    assert 0 < len(embedder.cache) <= cap // row_bytes
    # The key is what the embedder reads: a prompt that differs only past that point hits the cache.
    read = embedder.encoder.truncate(prompt)
    assert len(read) < 10_000 and prompt.startswith(read)
    hits_before = len(embedder.cache)
    np.testing.assert_allclose(embedder.encode([prompt + " and then something else"])[0], row, atol=1e-6)
    assert len(embedder.cache) == hits_before


def test_cache_counts_bytes_not_entries() -> None:
    cache = EmbeddingCache(max_bytes=10_000)
    for index in range(100):
        cache.put(cache.key(f"text {index}"), np.ones(384, dtype=np.float32))
    assert cache.bytes <= 10_000 and 1 <= len(cache) <= 10_000 // (384 * 4)
    assert cache.get(cache.key("text 99")) is not None and cache.get(cache.key("text 0")) is None
    assert EmbeddingCache(0).max_bytes == 0
    empty = Embedder(model=None, cache_bytes=0)
    assert empty.cache.max_bytes == 0


async def test_static_router_scores_a_lone_request_inline_and_batches_under_load(
        built: Path, clinc_train: tuple[list[str], list[str]], tmp_path: Path) -> None:
    import asyncio

    from core.modes import Mode
    from router.decision import RoutePolicy

    embedder = create_embedder(router_config("static"), cache_bytes=0)
    path = fit_detector_for_texts(*clinc_train, "knn", tmp_path / "det", embedder)
    router = OODRouter(embedder)
    router.load_detector("r", "v1", path)
    policy = RoutePolicy("r", Mode.auto, load_detector(path).meta["threshold_keep_95"], None, 0.0, "v1")
    lone = await router.decide(policy, [{"role": "user", "content": IN_SCOPE}])
    assert lone.target == "student" and router._batcher.batches == 0  # no worker-thread hop
    texts = [IN_SCOPE, OUT_OF_SCOPE] * 32
    decisions = await asyncio.gather(*(router.decide(policy, [{"role": "user", "content": t}]) for t in texts))
    assert router._batcher.batches >= 1  # concurrent requests still share batches
    assert [d.target for d in decisions] == ["student", "teacher"] * 32
    assert decisions[0].score == pytest.approx(lone.score, abs=1e-5)
    router.close()


@pytest.mark.parametrize(("kind", "detector"), [("static", "knn"), ("onnx", "knn"), ("static", "knn_lda"),
                                               ("static", "knn_tuned")])
def test_the_trainer_fits_with_the_embedder_the_config_names(
        kind: str, detector: str, built: Path, clinc_train: tuple[list[str], list[str]], tmp_path: Path) -> None:
    from types import SimpleNamespace

    from trainer.pipeline import Trainer

    settings = parse_settings({"store": {"path": str(tmp_path / "db.sqlite")},
                               "router": {"embedder": kind, "artifacts_dir": str(built)},
                               "routes": [{"name": "r", "teacher": {"model": "openai/x"}, "ood_detector": detector,
                                           "labels_dataset": str(CLINC)}]})
    store = SQLiteStore(settings.store.path)
    examples = [SimpleNamespace(prompt_text=text, answer=label) for text, label in zip(*clinc_train, strict=True)]
    path = Trainer(settings, store, progress=False)._fit_detector(settings.routes[0], SimpleNamespace(train=examples),
                                                                  tmp_path / "detector")
    store.close()
    served_with = create_embedder(settings.router)
    fitted = load_detector(path)
    assert fitted.name == detector and fitted.centroids is not None  # fitted with the teacher's labels
    assert fitted.meta["embedder"] == {"id": served_with.id, "dim": served_with.dim}
    OODRouter(served_with).load_detector("r", "v1", path)  # the gateway takes what the trainer fitted
