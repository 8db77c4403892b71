"""Auth under attack: every admin and dashboard route refuses client keys and strangers;
per-key route allow-lists and rate limits (429 + retry-after); keys never reach the logs,
the database or the spool."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from core.config import Settings, parse_settings
from gateway.app import create_app
from gateway.rate_limits import TokenBucket
from tests.helpers import MESSAGES, UvicornThread, log_rows, sdk

ADMIN_TOKEN = "admin-9f1c2e7d-secret"
CLIENT_KEY = "sk-client-4b8a0c3e-secret"
LIMITED_KEY = "sk-limited-77d2aa01-secret"
OTHER_KEY = "sk-other-0c55e3b2-secret"


def two_route_settings(teacher_url: str, tmp_path: Path) -> Settings:
    teacher = {"model": "openai/replay-teacher", "api_base": f"{teacher_url}/v1", "max_retries": 0}
    return parse_settings({
        "store": {"path": str(tmp_path / "log.db")},
        "vllm": {"url": "http://127.0.0.1:9", "launch": False},
        "auth": {"keys": [
            {"key_env": "LIMITED_KEY", "routes": ["clinc-intents"], "requests_per_minute": 3},
            {"key_env": "OTHER_KEY", "routes": ["other-route"]},
        ]},
        "routes": [{"name": "clinc-intents", "teacher": teacher}, {"name": "other-route", "teacher": teacher}],
    })


@pytest.fixture
def keyed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("DISTILLGATE_API_KEYS", CLIENT_KEY)
    monkeypatch.setenv("LIMITED_KEY", LIMITED_KEY)
    monkeypatch.setenv("OTHER_KEY", OTHER_KEY)


def test_token_bucket_refills_at_the_configured_rate() -> None:
    bucket = TokenBucket(capacity=2, refill_per_s=0.5, updated=100.0)
    assert [bucket.take(100.0), bucket.take(100.0)] == [0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(2.0)
    assert bucket.take(101.0) == pytest.approx(1.0)
    assert bucket.take(102.0) == 0.0


def test_keys_config_names_known_routes(replay_teacher: str, tmp_path: Path) -> None:
    from core.config import ConfigError

    with pytest.raises(ConfigError, match="unknown routes: nope"):
        parse_settings({"auth": {"keys": [{"key_env": "K", "routes": ["nope"]}]},
                        "routes": [{"name": "r", "teacher": {"model": "openai/x"}}]})


def test_per_key_routes_and_rate_limit(keyed_env: None, replay_teacher: str, tmp_path: Path) -> None:
    settings = two_route_settings(replay_teacher, tmp_path)
    with UvicornThread(create_app(settings)) as server:
        limited = sdk(server.url, LIMITED_KEY)
        for _ in range(3):
            limited.chat.completions.create(model="clinc-intents", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as limited_out:
            limited.chat.completions.create(model="clinc-intents", messages=MESSAGES)
        headers = limited_out.value.response.headers
        assert 1 <= int(headers["retry-after"]) <= 20 and int(headers["retry-after-ms"]) > 0
        assert limited_out.value.body["type"] == "rate_limit_error"  # type: ignore[index]

        other = sdk(server.url, OTHER_KEY)
        with pytest.raises(openai.NotFoundError):
            other.chat.completions.create(model="clinc-intents", messages=MESSAGES)
        assert other.chat.completions.create(model="other-route", messages=MESSAGES).choices[0].message.content
        assert [model.id for model in other.models.list().data] == ["other-route"]
        with pytest.raises(openai.NotFoundError):
            other.models.retrieve("clinc-intents")

        unlimited = sdk(server.url, CLIENT_KEY)  # DISTILLGATE_API_KEYS: no policy
        for _ in range(5):
            unlimited.chat.completions.create(model="clinc-intents", messages=MESSAGES)
        assert {model.id for model in unlimited.models.list().data} == {"clinc-intents", "other-route"}
        with pytest.raises(openai.AuthenticationError):
            sdk(server.url, "sk-unknown").chat.completions.create(model="clinc-intents", messages=MESSAGES)


def test_configured_keys_close_the_surface_even_when_unset(replay_teacher: str, tmp_path: Path) -> None:
    settings = two_route_settings(replay_teacher, tmp_path)  # LIMITED_KEY/OTHER_KEY not set
    with UvicornThread(create_app(settings)) as server:
        response = httpx.get(f"{server.url}/v1/models")
    assert response.status_code == 401


def test_every_admin_and_dashboard_route_refuses_client_keys(keyed_env: None, make_settings: Callable[..., Settings],
                                                             replay_teacher: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLGATE_METRICS_TOKEN", "scrape-token")

    from gateway.admin.endpoints import endpoints as admin_endpoints
    from gateway.dashboard.endpoints import endpoints as dashboard_endpoints
    from gateway.metrics import endpoints as metrics_endpoints

    app = create_app(make_settings(replay_teacher))
    # Walk the routers, so a route added later is covered without editing this test.
    protected = [(method, route.path.replace("{route}", "clinc-intents"))
                 for endpoints in (admin_endpoints, dashboard_endpoints, metrics_endpoints) for route in endpoints.routes
                 for method in route.methods - {"HEAD"}  # type: ignore[attr-defined]
                 if not route.path.startswith(("/dashboard/static", "/dashboard/log"))]  # type: ignore[attr-defined]
    assert len(protected) >= 9, protected
    with UvicornThread(app) as server:
        for method, path in protected:
            for headers in ({}, {"authorization": f"Bearer {CLIENT_KEY}"}, {"authorization": f"Bearer {LIMITED_KEY}"},
                            {"cookie": "distillgate_admin=forged"}):
                response = httpx.request(method, f"{server.url}{path}", headers=headers, json={})
                assert response.status_code == 401, (method, path, headers, response.status_code)
        admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        assert httpx.get(f"{server.url}/admin/routes", headers=admin).status_code == 200
        assert httpx.get(f"{server.url}/dashboard", headers=admin).status_code == 200


def test_keys_are_never_logged_or_stored(keyed_env: None, make_settings: Callable[..., Settings],
                                         replay_teacher: str, caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(replay_teacher)
    caplog.set_level(logging.DEBUG)
    with UvicornThread(create_app(settings)) as server:
        sdk(server.url, CLIENT_KEY).chat.completions.create(model="clinc-intents", messages=MESSAGES)
        list(sdk(server.url, CLIENT_KEY).chat.completions.create(model="clinc-intents", messages=MESSAGES,
                                                                 stream=True))
        with pytest.raises(openai.AuthenticationError):
            sdk(server.url, "sk-wrong-guess-secret").models.list()
        httpx.get(f"{server.url}/dashboard?token=wrong-admin-guess")
        httpx.get(f"{server.url}/admin/routes", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        rows = log_rows(settings, 2)
    assert rows and all(row["client_key_id"] and row["client_key_id"] not in CLIENT_KEY for row in rows)
    records = "\n".join(f"{record.getMessage()} {record.__dict__}" for record in caplog.records)
    stored = b"".join(path.read_bytes() for path in settings.store.path.parent.rglob("*") if path.is_file())
    for secret in (CLIENT_KEY, ADMIN_TOKEN, "sk-wrong-guess-secret", "wrong-admin-guess"):
        assert secret not in records, secret
        assert secret.encode() not in stored, secret
