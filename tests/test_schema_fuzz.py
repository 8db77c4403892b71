"""Schemathesis against the gateway's own OpenAPI schema, through real uvicorn: no 5xx, and
every error body in OpenAI's envelope (Anthropic's on the Anthropic Messages path). Bounded (derandomized, few examples per operation)
so it stays a few seconds on CI."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from core.config import parse_settings
from gateway.app import create_app
from tests.helpers import CLINC, UvicornThread

schemathesis = pytest.importorskip("schemathesis")  # in the `test` extra

ADMIN_TOKEN = "fuzz-admin-token"
ROUTE = "clinc-intents"


def _settings(teacher_url: str, db: str) -> Any:
    return parse_settings({
        "store": {"path": db},
        "vllm": {"url": "http://127.0.0.1:9", "launch": False},
        "routes": [{"name": ROUTE, "teacher": {"model": "openai/replay-teacher", "api_base": f"{teacher_url}/v1",
                                               "max_retries": 0, "timeout_s": 5}}],
    })


# The schema is read from an app that is never started: openapi() needs no lifespan.
schema = schemathesis.openapi.from_dict(create_app(_settings("http://127.0.0.1:9", ":memory:")).openapi())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from harness.replay_teacher import ReplayOptions, create_replay_app

    mp = pytest.MonkeyPatch()
    mp.setenv("DISTILLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
    with UvicornThread(create_replay_app(ReplayOptions(dataset=CLINC))) as teacher:
        app = create_app(_settings(teacher.url, str(tmp_path_factory.mktemp("fuzz") / "log.db")))
        with UvicornThread(app) as gateway:
            yield gateway.url
    mp.undo()


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
def test_no_5xx_and_openai_errors(case: Any, server: str) -> None:
    for headers in ({"authorization": f"Bearer {ADMIN_TOKEN}"}, {}):
        response = case.call(base_url=server, headers=headers, timeout=30)
        assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
        if response.status_code >= 400 and case.path.startswith("/v1/messages"):
            body = response.json()
            assert body.get("type") == "error" and set(body["error"]) == {"type", "message"}, (case.method, response.request.method, response.status_code, response.text[:300])
            assert body["error"]["message"]
        elif response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
