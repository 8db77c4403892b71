"""Shared fixtures: isolated environment, settings builder, replay teacher and gateway servers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.config import Settings, parse_settings
from tests.helpers import CLINC

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's OTEL_EXPORTER_OTLP_ENDPOINT would turn tracing on in every app a test builds.
    for name in ("DISTILLGATE_API_KEYS", "DISTILLGATE_ADMIN_TOKEN", "OPENAI_API_KEY", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings for one route ``clinc-intents`` against the given teacher/student URLs."""

    def build(teacher_url: str, student_url: str = "http://127.0.0.1:9", route: dict[str, Any] | None = None,
              **sections: Any) -> Settings:
        route_config = _merge({
            "name": "clinc-intents",
            "mode": "auto",
            "teacher": {"model": "openai/replay-teacher", "api_base": f"{teacher_url}/v1", "timeout_s": 5,
                        "max_retries": 1, "backoff_base_s": 0.01,
                        "prices": {"input_per_mtok": 2.5, "output_per_mtok": 10.0}},
            "student": {"system_prompt": "Intent label:", "timeout_s": 5,
                        "prices": {"input_per_mtok": 0.02, "output_per_mtok": 0.02}},
        }, route or {})
        data = _merge({"store": {"path": str(tmp_path / "distillgate.db"), "flush_interval_s": 0.01},
                       "vllm": {"url": student_url, "launch": False}, "routes": [route_config]}, sections)
        return parse_settings(data)

    return build


@pytest.fixture(params=["httpx", "litellm"])
def teacher_client(request: pytest.FixtureRequest) -> str:
    """Each client an OpenAI-compatible teacher can be called with (``teacher.client``)."""
    return str(request.param)


@pytest.fixture(scope="session")
def clinc_path() -> Path:
    return CLINC


@pytest.fixture(scope="session")
def replay_teacher() -> Iterator[str]:
    """A replay teacher (stand-in for the frontier API) at accuracy 1, no latency."""
    from harness.replay_teacher import ReplayOptions, create_replay_app
    from tests.helpers import UvicornThread

    with UvicornThread(create_replay_app(ReplayOptions(dataset=CLINC))) as server:
        yield server.url
pytest_plugins = ["tests.fixtures_processes", "tests.fixtures_postgres"]


# Tiers by what a test really runs, read from the fixtures it uses, so a new test lands in the
# right tier without anyone remembering a marker: ``make test-fast`` runs neither.
_VLLM_FIXTURES = {"vllm_server"}
_PROCESS_FIXTURES = {"redis_server"}  # a child process on loopback
_SLOW_FIXTURES = {"student_base_dir", "embedder"}  # build a student base; load the real embedding model


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & _VLLM_FIXTURES:
            item.add_marker(pytest.mark.vllm)
            item.add_marker(pytest.mark.integration)
        if fixtures & _PROCESS_FIXTURES:
            item.add_marker(pytest.mark.integration)
        if fixtures & _SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)
