"""Admin overrides that must never break a route: null and non-finite values are 400,
bounds hold, an override can be cleared, and a bad persisted one is ignored at start."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai
import pytest

from core.config import Settings
from core.store import SQLiteStore
from gateway.app import create_app
from tests.helpers import UvicornThread

ADMIN = {"authorization": "Bearer admin-secret"}
ROUTE_URL = "/admin/routes/clinc-intents"
UTTERANCE = "transfer $20000 from my savings account to checking account"


@pytest.fixture
def admin_settings(make_settings: Callable[..., Settings], replay_teacher: str,
                   monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("DISTILLGATE_ADMIN_TOKEN", "admin-secret")
    monkeypatch.setenv("DISTILLGATE_API_KEYS", "client-key")
    return make_settings(replay_teacher)


def _route_serves(url: str) -> None:
    """A chat request, the admin listing and the metrics all answer 200."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="client-key", max_retries=0)
    reply = client.chat.completions.create(model="clinc-intents", messages=[{"role": "user", "content": UTTERANCE}])
    assert reply.choices[0].message.content
    assert httpx.get(f"{url}/admin/routes", headers=ADMIN).status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200


BAD_BODIES = [
    ('{"ood_threshold": null}', "ood_threshold"),
    ('{"shadow_rate": null}', "shadow_rate"),
    ('{"mode": null}', "mode"),
    ('{"confidence_threshold": null}', "confidence_threshold"),
    ('{"ood_threshold": NaN}', "ood_threshold"),
    ('{"ood_threshold": Infinity}', "ood_threshold"),
    ('{"confidence_threshold": -Infinity}', "confidence_threshold"),
    ('{"confidence_threshold": 0.5}', "confidence_threshold"),
    ('{"shadow_rate": true}', "shadow_rate"),
    ('{"ood_threshold": "0.3"}', "ood_threshold"),
]


def test_null_and_non_finite_values_are_400_and_the_route_keeps_serving(admin_settings: Settings) -> None:
    with UvicornThread(create_app(admin_settings)) as server:
        for body, param in BAD_BODIES:
            response = httpx.patch(f"{server.url}{ROUTE_URL}", headers={**ADMIN, "content-type": "application/json"},
                                   content=body)
            assert response.status_code == 400, (body, response.text)
            assert response.json()["error"]["param"] == param, body
        assert httpx.get(f"{server.url}{ROUTE_URL}", headers=ADMIN).json()["overrides"] == {}
        _route_serves(server.url)
    with UvicornThread(create_app(admin_settings)) as restarted:
        _route_serves(restarted.url)


def test_an_override_is_cleared_explicitly_and_the_config_applies_again(admin_settings: Settings) -> None:
    with UvicornThread(create_app(admin_settings)) as server:
        httpx.patch(f"{server.url}{ROUTE_URL}", headers=ADMIN, json={"ood_threshold": 0.2, "shadow_rate": 0.3})
        cleared = httpx.delete(f"{server.url}{ROUTE_URL}/overrides/ood_threshold", headers=ADMIN)
        assert cleared.status_code == 200, cleared.text
        assert cleared.json()["ood_threshold"] == 0.5 and cleared.json()["overrides"] == {"shadow_rate": 0.3}
        unknown = httpx.delete(f"{server.url}{ROUTE_URL}/overrides/odd_threshold", headers=ADMIN)
        assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "odd_threshold"
        everything = httpx.delete(f"{server.url}{ROUTE_URL}/overrides", headers=ADMIN).json()
        assert everything["overrides"] == {} and everything["shadow_rate"] == 0.0
        audit = httpx.get(f"{server.url}{ROUTE_URL}/audit", headers=ADMIN).json()["data"]
        assert [(entry["field"], entry["new_json"]) for entry in audit[:2]] == [("shadow_rate", "null"),
                                                                                 ("ood_threshold", "null")]
        assert httpx.delete(f"{server.url}{ROUTE_URL}/overrides").status_code == 401
    with UvicornThread(create_app(admin_settings)) as restarted:
        assert httpx.get(f"{restarted.url}{ROUTE_URL}", headers=ADMIN).json()["overrides"] == {}


def test_a_bad_persisted_override_is_reported_and_ignored_at_start(admin_settings: Settings) -> None:
    # As an older gateway (or a hand edit) could have left them in the store.
    store = SQLiteStore(admin_settings.store.path)
    store.set_route_overrides("clinc-intents", {"ood_threshold": None, "mode": "sometimes", "shadow_rate": 0.1,
                                                "odd_threshold": 3}, "admin:old")
    store.close()
    with UvicornThread(create_app(admin_settings)) as server:
        described = httpx.get(f"{server.url}{ROUTE_URL}", headers=ADMIN).json()
        assert described["overrides"] == {"shadow_rate": 0.1}
        assert set(described["ignored_overrides"]) == {"ood_threshold", "mode", "odd_threshold"}
        assert described["ood_threshold"] == 0.5 and described["mode"] == "auto"
        _route_serves(server.url)
        cleared = httpx.delete(f"{server.url}{ROUTE_URL}/overrides", headers=ADMIN).json()
        assert cleared["overrides"] == {} and cleared["ignored_overrides"] == {}
    reopened = SQLiteStore(admin_settings.store.path)
    assert reopened.route_overrides("clinc-intents") == {}
    reopened.close()


@pytest.mark.parametrize("force", ["false", "true", 1, 0, None, []])
def test_promote_force_must_be_a_json_boolean(admin_settings: Settings, force: object) -> None:
    from core.registry import CandidateVersion, Registry

    store = SQLiteStore(admin_settings.store.path)
    Registry(store).record(CandidateVersion("clinc-intents", "v1", "rejected", "/nowhere/v1"))
    store.close()
    with UvicornThread(create_app(admin_settings)) as server:
        response = httpx.post(f"{server.url}{ROUTE_URL}/promote", headers=ADMIN, json={"version": "v1", "force": force})
        versions = httpx.get(f"{server.url}{ROUTE_URL}/versions", headers=ADMIN).json()["data"]
    assert response.status_code == 400 and response.json()["error"]["param"] == "force"
    assert versions[0]["status"] == "rejected"
