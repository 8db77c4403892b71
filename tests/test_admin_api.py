"""Admin API: live route settings (validated, persisted, audited) and its auth."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai
import pytest

from core.config import Settings
from gateway.app import create_app
from tests.helpers import UvicornThread

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
             ("POST", "/admin/routes/clinc-intents/rollback")]
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
