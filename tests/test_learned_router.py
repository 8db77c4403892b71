"""The learned router, live: trained in the cycle on the candidate's own holdout answers,
saved with the version, swapped in with its detector, shown in /admin/routes, and vetoing.

The scenario: ten CLINC150 intents; the "student" agrees with the teacher on five of them and
never on the other five, so a learned router fitted on the holdout must tell them apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from core.config import ConfigError, LearnedRouterConfig, Settings, parse_settings
from core.prompting import student_messages
from core.registry import CandidateVersion, Registry
from core.store import SQLiteStore
from gateway.route_table import RouteTable
from gateway.training.swap import Swapper
from gateway.upstream.student import VLLMStudent
from router.artifacts import create_embedder
from router.learned import LearnedRouter, fit_for_version
from router.ood import fit_detector_for_texts
from router.ood_router import OODRouter
from tests.helpers import CLINC, ROOT, UvicornThread, fake_adapter
from tests.operators import _student_reply
from trainer.dataset import Example
from trainer.learned_fit import fit_learned_router

ROUTE = "clinc-intents"
ARTIFACTS = ROOT / "var" / "models" / "router"
ADMIN = {"authorization": "Bearer admin-secret"}


@pytest.fixture(scope="module")
def scenario() -> dict[str, Any]:
    """Detector training prompts, holdout prompts with the student's agreement, and unseen
    prompts of an agreeing and of a disagreeing intent."""
    data = json.loads(CLINC.read_text())
    intents = sorted({intent for _, intent in data["train"]})[::15][:10]
    agreeing = set(intents[:5])
    test = {intent: [text for text, label in data["test"] if label == intent] for intent in intents}
    holdout = [(text, intent) for intent in intents for text in test[intent][:20]]
    return {
        "train": [(text, intent) for text, intent in data["train"] if intent in intents],
        "holdout": [Example(student_messages("Intent label:", [{"role": "user", "content": text}]), intent, text)
                    for text, intent in holdout],
        "agrees": [intent in agreeing for _, intent in holdout],
        "agreeing_prompt": test[intents[0]][25], "disagreeing_prompt": test[intents[9]][25],
    }


def route_settings(tmp_path: Path, learned: dict[str, Any], teacher_url: str = "http://teacher.test") -> Settings:
    """The route with the learned router configured as given; no OOD veto (threshold 9)."""
    return parse_settings({
        "store": {"path": str(tmp_path / "db.sqlite"), "flush_interval_s": 0.01},
        "router": {"embedder": "static", "artifacts_dir": str(ARTIFACTS)},
        "vllm": {"url": "http://vllm.test", "launch": False},
        "routes": [{"name": ROUTE, "teacher": {"model": "openai/replay-teacher", "api_base": f"{teacher_url}/v1"},
                    "student": {"system_prompt": "Intent label:"}, "ood_threshold": 9.0,
                    "learned_router": learned}],
    })


@pytest.fixture(scope="module")
def static_embedder(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The gateway's default embedder, built once per machine under var/models/router."""
    return create_embedder(route_settings(tmp_path_factory.mktemp("embedder"), {}).router, build=True)


def trained_version(settings: Settings, scenario: dict[str, Any], embedder: Any, out: Path) -> CandidateVersion:
    """What a training cycle leaves: adapter, detector and learned router, in the registry."""
    texts, intents = zip(*scenario["train"], strict=True)
    detector = fit_detector_for_texts(texts, intents, "knn", out / "detector", embedder)
    summary = fit_learned_router(settings.routes[0], "v1", lambda: embedder, scenario["holdout"], scenario["agrees"],
                                 detector, out / "learned_router")
    store = SQLiteStore(settings.store.path)
    version = Registry(store).record(CandidateVersion(
        ROUTE, "v1", "candidate", fake_adapter(out / "adapter"), detector_path=str(detector),
        metrics={"learned_router": summary}))
    store.close()
    return version


def test_fit_needs_enough_pairs_of_both_classes() -> None:
    rng = np.random.default_rng(0)
    embeddings, scores = rng.normal(size=(120, 8)), rng.uniform(size=120)
    agree = embeddings[:, 0] > 0
    model, summary = fit_for_version(embeddings[:50], scores[:50], agree[:50], min_pairs=100)
    assert model is None and summary["skipped"] == "50 pairs < min_pairs 100"
    model, summary = fit_for_version(embeddings, scores, np.ones(120, dtype=bool), min_pairs=100)
    assert model is None and "one class" in summary["skipped"]
    model, summary = fit_for_version(embeddings, scores, agree, min_pairs=100)
    assert model is not None and summary["pairs"] == 120 and summary["cv_auroc"] > 0.9


def test_the_cycle_trains_and_saves_it_from_the_versions_holdout(
        scenario: dict[str, Any], static_embedder: Any, tmp_path: Path) -> None:
    settings = route_settings(tmp_path, {"enabled": True, "min_pairs": 50})
    version = trained_version(settings, scenario, static_embedder, tmp_path / "v1")
    summary = version.metrics["learned_router"]
    assert summary["pairs"] == 200 and summary["agree_rate"] == 0.5 and summary["cv_auroc"] > 0.9
    model = LearnedRouter.load(summary["path"])
    prompts = static_embedder.encode([scenario["agreeing_prompt"], scenario["disagreeing_prompt"]])
    p_agree = model.predict_agree(prompts, [0.2, 0.2])
    assert p_agree[0] > 0.5 > p_agree[1]
    strict = settings.routes[0].model_copy(update={"learned_router": LearnedRouterConfig(min_pairs=500)})
    too_few = fit_learned_router(strict, "v2", lambda: static_embedder, scenario["holdout"], scenario["agrees"],
                                 version.detector_path, tmp_path / "v2" / "learned_router")
    assert too_few["skipped"] == "200 pairs < min_pairs 500" and not (tmp_path / "v2").exists()


@pytest.mark.parametrize("enabled", [True, False])
async def test_the_swap_loads_it_with_the_detector_and_it_vetoes(
        scenario: dict[str, Any], static_embedder: Any, tmp_path: Path, enabled: bool) -> None:
    settings = route_settings(tmp_path, {"enabled": enabled, "min_pairs": 50})
    trained_version(settings, scenario, static_embedder, tmp_path / "v1")
    store = SQLiteStore(settings.store.path)
    routes, router = RouteTable(settings, store), OODRouter(static_embedder)
    student = VLLMStudent("http://vllm.test", transport=httpx.MockTransport(vllm_reply))
    swapper = Swapper(student, routes, store, route_configs={ROUTE: settings.routes[0]}, detectors=router)
    await swapper.promote(ROUTE, "v1")
    shown = routes.get(ROUTE).describe()["learned_router"]
    assert shown == {"enabled": enabled, "active": enabled, "min_agree": 0.5, "pairs": 200,
                     "holdout_auroc": pytest.approx(1.0, abs=0.1)}
    policy = routes.get(ROUTE).policy()
    vetoed = await router.decide(policy, [{"role": "user", "content": scenario["disagreeing_prompt"]}])
    served = await router.decide(policy, [{"role": "user", "content": scenario["agreeing_prompt"]}])
    assert served.target == "student"
    assert vetoed.target == ("teacher" if enabled else "student")
    assert any(reason.startswith("learned p_agree") for reason in vetoed.reasons) is enabled
    await student.aclose()
    router.close()
    store.close()


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="min_agree"):
        parse_settings({"routes": [{"name": "r", "teacher": {"model": "openai/x"},
                                    "learned_router": {"min_agree": 1.5}}]})
    with pytest.raises(ConfigError, match="min_pair"):
        parse_settings({"routes": [{"name": "r", "teacher": {"model": "openai/x"},
                                    "learned_router": {"min_pair": 10}}]})
    assert parse_settings({"routes": [{"name": "r", "teacher": {"model": "openai/x"}}]}).routes[0] \
        .learned_router.enabled is False  # off by default: it added nothing on CLINC150 (README)


def vllm_reply(request: httpx.Request) -> httpx.Response:
    if request.url.path.endswith(("load_lora_adapter", "unload_lora_adapter")):
        return httpx.Response(200, text="ok")
    return _student_reply(request)


@pytest.mark.integration
def test_a_gateway_after_a_swap_reports_it_and_sends_what_it_rejects_to_the_teacher(
        scenario: dict[str, Any], static_embedder: Any, tmp_path: Path, replay_teacher: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.app import Components, create_app

    monkeypatch.setenv("DISTILLGATE_ADMIN_TOKEN", "admin-secret")
    settings = route_settings(tmp_path, {"enabled": True, "min_pairs": 50}, teacher_url=replay_teacher)
    trained_version(settings, scenario, static_embedder, tmp_path / "v1")
    student = VLLMStudent("http://vllm.test", transport=httpx.MockTransport(vllm_reply))
    with UvicornThread(create_app(settings, Components(student=student))) as server:
        promoted = httpx.post(f"{server.url}/admin/routes/{ROUTE}/promote", headers=ADMIN, json={"version": "v1"})
        shown = httpx.get(f"{server.url}/admin/routes", headers=ADMIN).json()["data"][0]
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        targets = {}
        for kind in ("agreeing_prompt", "disagreeing_prompt"):
            raw = client.chat.completions.with_raw_response.create(
                model=ROUTE, messages=[{"role": "user", "content": scenario[kind]}], max_tokens=8)
            targets[kind] = raw.headers["x-distillgate-target"]
    assert promoted.status_code == 200 and shown["student_version"] == "v1"
    assert shown["learned_router"]["active"] is True and shown["learned_router"]["pairs"] == 200
    assert targets == {"agreeing_prompt": "student", "disagreeing_prompt": "teacher"}
