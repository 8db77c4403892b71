"""Drift through the gateway (real uvicorn, the openai SDK, the replay teacher, a mock vLLM
student, the OOD router): far-off prompts move the drift gauges in /metrics, the admin API
and the dashboard's drift line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from core.config import Settings
from gateway.app import Components, create_app
from gateway.upstream.student import VLLMStudent
from router.embeddings import Embedder
from router.ood_router import OODRouter
from tests.helpers import UvicornThread, sdk
from tests.operators import _student_reply, scrape, total
from tests.test_router_decide import LengthDetector, LengthModel

ROUTE = "clinc-intents"
ADMIN = {"authorization": "Bearer admin-secret"}
# The length detector scores a prompt by its length / 10: these stay under the 5.0 threshold ...
NEAR = ["what is my balance", "set a timer", "play some jazz", "tell me a joke"]
# ... and these CLINC150 utterances are far over it.
FAR = ["does ireland have any travel alerts i should be aware of",
       "i need $20000 transferred from my savings to my checking account today",
       "how do i go about finding out the routing number for my bank account"]


@pytest.fixture
def drift_app(make_settings: Callable[..., Settings], replay_teacher: str,
              monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("DISTILLGATE_ADMIN_TOKEN", "admin-secret")
    settings = make_settings(replay_teacher, route={
        "student": {"serve_base_model": True}, "ood_threshold": 5.0,
        "drift": {"window": 10, "min_requests": 4, "max_ood_share": 0.5}})
    detector = LengthDetector()
    detector.meta = {"threshold_keep_95": 2.0}  # 95 % of the training prompts were under 20 characters
    router = OODRouter(Embedder(model=LengthModel(), cache_bytes=0), seed=0)
    router.set_detector(ROUTE, "base", detector)
    student = VLLMStudent("http://student.test", transport=httpx.MockTransport(_student_reply))
    yield create_app(settings, Components(student=student, router=router))
    router.close()


def ask(url: str, prompts: list[str]) -> list[str]:
    targets = []
    for prompt in prompts:
        raw = sdk(url).chat.completions.with_raw_response.create(
            model=ROUTE, messages=[{"role": "user", "content": prompt}])
        targets.append(raw.headers["x-distillgate-target"])
    return targets


def test_far_off_prompts_raise_the_drift_gauges(drift_app: Any) -> None:
    labels = {"route": ROUTE}
    with UvicornThread(drift_app) as server:
        before = scrape(server.url)
        assert total(before, "distillgate_drift_window_requests", **labels) == 0
        assert total(before, "distillgate_drift_retrains_total", **labels) == 0

        assert ask(server.url, NEAR) == ["student"] * 4
        near = scrape(server.url)
        assert ask(server.url, FAR * 3) == ["teacher"] * 9  # the window keeps the last 10: 1 near, 9 far
        far = scrape(server.url)
        route = httpx.get(f"{server.url}/admin/routes/{ROUTE}", headers=ADMIN).json()
        page = httpx.get(f"{server.url}/dashboard/routes/{ROUTE}", headers=ADMIN)

    assert total(near, "distillgate_drift_window_requests", **labels) == 4
    assert total(near, "distillgate_drift_ood_share", **labels) == 0
    assert total(near, "distillgate_drift_novel_share", **labels) == 0
    assert total(far, "distillgate_drift_window_requests", **labels) == 10
    assert total(far, "distillgate_drift_ood_share", **labels) == pytest.approx(0.9)
    assert total(far, "distillgate_drift_novel_share", **labels) == pytest.approx(0.9)

    drift = route["drift"]
    assert drift["tracked"] and drift["version"] == "base" and drift["requests"] == 10
    assert drift["ood_share"] == pytest.approx(0.9) and drift["ood_threshold"] == 5.0
    assert "ood_share 0.900 > max_ood_share 0.500" in drift["drift_reason"]
    assert drift["retrains"] == 0 and drift["last_retrain"] is None  # no schedule: no config file

    assert page.status_code == 200
    assert 'id="drift-ood-share">90.0%' in page.text and "retrain early above 50.0%" in page.text
    assert "drifting" in page.text and 'id="drift-last-retrain">never' in page.text
