"""Admin API: live route settings (validated, persisted, audited) and its auth."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from core.config import Settings
from core.registry import CandidateVersion, Registry
from core.store import SQLiteStore
from gateway.app import Components, create_app
from gateway.auth import key_id
from gateway.upstream.student import VLLMStudent
from tests.helpers import UvicornThread, fake_adapter
from tests.operators import ScoringRouter, _student_reply

ROUTE = "clinc-intents"

ADMIN = {"authorization": "Bearer admin-secret"}


@pytest.fixture
def admin_settings(make_settings: Callable[..., Settings], replay_teacher: str,
                   monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("DISTILLGATE_ADMIN_TOKEN", "admin-secret")
    monkeypatch.setenv("DISTILLGATE_API_KEYS", "client-key")
    return make_settings(replay_teacher)


def test_patch_is_live_persisted_and_audited(admin_settings: Settings) -> None:
    with UvicornThread(create_app(admin_settings)) as server:
        before = httpx.get(f"{server.url}/admin/routes/clinc-intents", headers=ADMIN).json()
        assert before["ood_threshold"] == 0.5 and before["student_version"] is None
        assert before["teacher_client"] == "httpx", "an openai/ teacher at an api_base takes the httpx client"
        changed = httpx.patch(f"{server.url}/admin/routes/clinc-intents", headers=ADMIN,
                              json={"ood_threshold": 0.35, "shadow_rate": 0.2, "mode": "teacher_only"})
        assert changed.status_code == 200, changed.text
        assert (changed.json()["ood_threshold"], changed.json()["mode"]) == (0.35, "teacher_only")
        listed = httpx.get(f"{server.url}/admin/routes", headers=ADMIN).json()["data"]
        assert listed[0]["shadow_rate"] == 0.2
        audit = httpx.get(f"{server.url}/admin/routes/clinc-intents/audit", headers=ADMIN).json()["data"]
        assert {entry["field"] for entry in audit} == {"ood_threshold", "shadow_rate", "mode"}
        assert all(entry["actor"].startswith("admin:") and "admin-secret" not in entry["actor"] for entry in audit)
    with UvicornThread(create_app(admin_settings)) as restarted:
        after = httpx.get(f"{restarted.url}/admin/routes/clinc-intents", headers=ADMIN).json()
    assert (after["ood_threshold"], after["shadow_rate"], after["mode"]) == (0.35, 0.2, "teacher_only")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"ood_threshold": -1}, "ood_threshold"),
        ({"shadow_rate": 1.5}, "shadow_rate"),
        ({"mode": "sometimes"}, "mode"),
        ({"odd_threshold": 0.3}, "odd_threshold"),
        ({}, None),
    ],
)
def test_patch_validation_errors_name_the_setting(admin_settings: Settings, body: dict, param: str | None) -> None:
    with UvicornThread(create_app(admin_settings)) as server:
        response = httpx.patch(f"{server.url}/admin/routes/clinc-intents", headers=ADMIN, json=body)
        unchanged = httpx.get(f"{server.url}/admin/routes/clinc-intents", headers=ADMIN).json()
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert unchanged["overrides"] == {}


def test_admin_routes_refuse_without_the_admin_token(admin_settings: Settings) -> None:
    paths = [("GET", "/admin/routes"), ("GET", "/admin/routes/clinc-intents"),
             ("PATCH", "/admin/routes/clinc-intents"), ("GET", "/admin/routes/clinc-intents/versions"),
             ("GET", "/admin/routes/clinc-intents/audit"), ("POST", "/admin/routes/clinc-intents/promote"),
             ("POST", "/admin/routes/clinc-intents/rollback"), ("POST", "/admin/routes/clinc-intents/canary")]
    with UvicornThread(create_app(admin_settings)) as server:
        for method, path in paths:
            for headers in ({}, {"authorization": "Bearer client-key"}, {"authorization": "Bearer wrong"}):
                response = httpx.request(method, f"{server.url}{path}", headers=headers, json={"ood_threshold": 0.1})
                assert response.status_code == 401, (method, path, headers)
                assert response.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{server.url}/admin/routes/clinc-intents", headers=ADMIN).json()["overrides"] == {}


def test_teacher_only_mode_takes_effect_on_the_next_request(admin_settings: Settings) -> None:
    with UvicornThread(create_app(admin_settings)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="client-key", max_retries=0)
        httpx.patch(f"{server.url}/admin/routes/clinc-intents", headers=ADMIN, json={"mode": "student_only"})
        raw = client.chat.completions.with_raw_response.create(
            model="clinc-intents", messages=[{"role": "user", "content": "what is my balance"}])
    # student_only with no student yet is still a cold start: the teacher serves.
    assert raw.headers["x-distillgate-target"] == "teacher"


def test_admin_api_is_off_without_a_configured_token(make_settings: Callable[..., Settings],
                                                      replay_teacher: str) -> None:
    with UvicornThread(create_app(make_settings(replay_teacher))) as server:
        response = httpx.get(f"{server.url}/admin/routes", headers=ADMIN)
    assert response.status_code == 403 and response.json()["error"]["type"] == "permission_error"


def test_unknown_route_and_version_are_404(admin_settings: Settings) -> None:
    with UvicornThread(create_app(admin_settings)) as server:
        missing_route = httpx.patch(f"{server.url}/admin/routes/nope", headers=ADMIN, json={"ood_threshold": 1})
        missing_version = httpx.post(f"{server.url}/admin/routes/clinc-intents/promote", headers=ADMIN,
                                     json={"version": "v99"})
    assert missing_route.status_code == 404 and missing_version.status_code == 404


def _vllm_reply(request: httpx.Request) -> httpx.Response:
    if request.url.path.endswith(("load_lora_adapter", "unload_lora_adapter")):
        return httpx.Response(200, text="ok")
    return _student_reply(request)


def test_promote_rollback_and_force_are_audited_with_the_actor(admin_settings: Settings, tmp_path: Path) -> None:
    store = SQLiteStore(admin_settings.store.path)
    registry = Registry(store)
    for version, status in (("v1", "candidate"), ("v2", "candidate"), ("v3", "rejected")):
        registry.record(CandidateVersion(ROUTE, version, status, fake_adapter(tmp_path / version)))
    store.close()
    student = VLLMStudent("http://vllm.test", transport=httpx.MockTransport(_vllm_reply))
    app = create_app(admin_settings, Components(student=student, router=ScoringRouter()))
    base = f"/admin/routes/{ROUTE}"
    with UvicornThread(app) as server:
        calls = [httpx.post(f"{server.url}{base}/promote", headers=ADMIN, json={"version": "v1"}),
                 httpx.post(f"{server.url}{base}/promote", headers=ADMIN, json={"version": "v2"}),
                 httpx.post(f"{server.url}{base}/rollback", headers=ADMIN),
                 httpx.post(f"{server.url}{base}/promote", headers=ADMIN, json={"version": "v3"}),
                 httpx.post(f"{server.url}{base}/promote", headers=ADMIN, json={"version": "v3", "force": True})]
        audit = httpx.get(f"{server.url}{base}/audit", headers=ADMIN).json()["data"]
    assert [call.status_code for call in calls] == [200, 200, 200, 409, 200]
    events = [(entry["field"], json.loads(entry["old_json"]), json.loads(entry["new_json"])) for entry in reversed(audit)]
    assert [(action, old) for action, old, _ in events] == [
        ("promote", None), ("promote", "v1"), ("rollback", "v2"), ("promote", "v1"), ("promote --force", "v1")]
    assert [new.get("version") for _, _, new in events] == ["v1", "v2", "v1", "v3", "v3"]
    assert "refused" in events[3][2] and "refused" not in events[4][2]
    actor = f"admin:{key_id('admin-secret')}"
    assert all(entry["actor"] == actor for entry in audit)
