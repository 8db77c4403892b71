"""Per-key rate limits shared by gateway replicas through Redis (``rate_limit.storage``).

Through real processes: two ``distillgate serve`` replicas and one real ``redis-server``; a
key's budget used up on one replica is refused on the other (429, OpenAI's error format),
and when Redis dies each replica does what its ``on_storage_error`` says, counted in
/metrics. Fast tier: a Redis URL where nothing listens (fail open, fail closed), the
config's checks and the moving window's arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from core.config import ConfigError, Settings, parse_settings
from gateway import rate_limits
from gateway.app import create_app
from gateway.rate_limits import Rate
from harness.children import Child, free_port, python_module
from tests.helpers import MESSAGES, UvicornThread, sdk
from tests.operators import scrape, total

ROUTE = "clinc-intents"
LIMITED_KEY = "sk-limited-5e1f93aa-secret"
OTHER_KEY = "sk-other-a2c4d6e8-secret"
KEYS = [{"key_env": "LIMITED_KEY", "requests_per_minute": 3}, {"key_env": "OTHER_KEY", "requests_per_minute": 3}]
KEY_ENV = {"LIMITED_KEY": LIMITED_KEY, "OTHER_KEY": OTHER_KEY, "DISTILLGATE_ADMIN_TOKEN": "admin-t"}


def _replica_config(tmp_path: Path, name: str, teacher_url: str, redis_url: str, on_storage_error: str) -> Path:
    config = {
        "store": {"path": str(tmp_path / f"{name}.db")},
        "vllm": {"url": f"http://127.0.0.1:{free_port()}", "launch": False},
        "auth": {"keys": KEYS},
        "rate_limit": {"storage": redis_url, "on_storage_error": on_storage_error},
        "routes": [{"name": ROUTE, "mode": "teacher_only",
                    "teacher": {"model": "openai/replay-teacher", "api_base": f"{teacher_url}/v1", "timeout_s": 10}}],
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _replica(config: Path, log: Path) -> Child:
    port = free_port()
    args = python_module("cli.main", "serve", "--config", str(config), "--port", str(port), "--log-dir", str(log.parent))
    return Child(args, f"http://127.0.0.1:{port}/healthz", log, env=KEY_ENV)


def _url(child: Child) -> str:
    return child.ready_url.removesuffix("/healthz")


def _ask(url: str, key: str) -> Any:
    return sdk(url, key).chat.completions.create(model=ROUTE, messages=MESSAGES)


def test_two_replicas_share_a_key_budget_through_redis(tmp_path: Path, replay_teacher: str, redis_server: Any) -> None:
    first = _replica(_replica_config(tmp_path, "a", replay_teacher, redis_server.url, "allow"), tmp_path / "a" / "log")
    second = _replica(_replica_config(tmp_path, "b", replay_teacher, redis_server.url, "refuse"), tmp_path / "b" / "log")
    with first, second:
        a, b = _url(first), _url(second)
        for _ in range(3):  # the key's whole budget (3 a minute), spent on the first replica
            assert _ask(a, LIMITED_KEY).choices[0].message.content
        with pytest.raises(openai.RateLimitError) as refused:
            _ask(b, LIMITED_KEY)
        assert refused.value.body["type"] == "rate_limit_error"  # type: ignore[index]
        assert 1 <= int(refused.value.response.headers["retry-after"]) <= 60
        assert int(refused.value.response.headers["retry-after-ms"]) > 0
        assert _ask(b, OTHER_KEY).choices[0].message.content, "another key's budget is its own"

        redis_server.stop()
        # Fail open on the first replica: served although the key is over its budget.
        assert _ask(a, LIMITED_KEY).choices[0].message.content
        # Fail closed on the second: 503 in OpenAI's format.
        response = httpx.post(f"{b}/v1/chat/completions", json={"model": ROUTE, "messages": MESSAGES},
                              headers={"authorization": f"Bearer {OTHER_KEY}"}, timeout=10)
        assert response.status_code == 503 and response.json()["error"]["type"] == "service_unavailable"
        opened, closed = scrape(a), scrape(b)
    assert total(opened, "distillgate_rate_limit_storage_errors_total", storage="redis") >= 1
    assert total(opened, "distillgate_rate_limit_unchecked_total", outcome="allowed") == 1
    assert total(closed, "distillgate_rate_limit_unchecked_total", outcome="refused") == 1


# -- fast tier ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("on_storage_error", "status"), [("allow", 200), ("refuse", 503)])
def test_unreachable_redis_fails_open_or_closed_as_configured(make_settings: Callable[..., Settings],
                                                              replay_teacher: str, monkeypatch: pytest.MonkeyPatch,
                                                              on_storage_error: str, status: int) -> None:
    monkeypatch.setenv("LIMITED_KEY", LIMITED_KEY)
    monkeypatch.setattr(rate_limits, "ERROR_BACKOFF_S", 30.0)  # longer than the test: one storage call
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = make_settings(replay_teacher, auth={"keys": KEYS[:1]},
                             rate_limit={"storage": nowhere, "on_storage_error": on_storage_error})
    body = {"model": ROUTE, "messages": MESSAGES}
    with UvicornThread(create_app(settings)) as server:
        responses = [httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=10,
                                headers={"authorization": f"Bearer {LIMITED_KEY}"}) for _ in range(5)]
        samples = scrape(server.url)
    assert [response.status_code for response in responses] == [status] * 5, "over the limit, still not limited"
    if status == 503:
        error = responses[0].json()["error"]
        assert error["type"] == "service_unavailable" and responses[0].headers["retry-after"] == "30"
    # One failed call; for ERROR_BACKOFF_S after it Redis is not asked again.
    assert total(samples, "distillgate_rate_limit_storage_errors_total") == 1
    outcome = "allowed" if status == 200 else "refused"
    assert total(samples, "distillgate_rate_limit_unchecked_total", outcome=outcome) == 5


def test_rate_limit_config_is_checked() -> None:
    route = [{"name": ROUTE, "teacher": {"model": "openai/x"}}]
    with pytest.raises(ConfigError, match="must be a Redis URL"):
        parse_settings({"rate_limit": {"storage": "memcached://127.0.0.1:11211"}, "routes": route})
    with pytest.raises(ConfigError, match="not both"):
        parse_settings({"rate_limit": {"storage": "redis://h:6379/0", "storage_env": "RL_URL"}, "routes": route})
    with pytest.raises(ConfigError, match="on_storage_error"):
        parse_settings({"rate_limit": {"on_storage_error": "maybe"}, "routes": route})
    settings = parse_settings({"rate_limit": {"storage_env": "RL_URL"}, "routes": route})
    with pytest.raises(ConfigError, match="RL_URL, which is not set"):
        settings.rate_limit.storage_url()


def test_moving_window_keeps_the_rate_and_the_burst() -> None:
    assert Rate.of(3, None).window() == (3, 60)  # default burst: a minute's worth
    assert Rate.of(600, 50).window() == (50, 5)
    assert Rate.of(7, 1).window() == (1, 9)  # 8.57 s rounded up: never looser than the rate
