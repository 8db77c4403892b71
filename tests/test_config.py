"""Config: strict for ourselves — a typo or a bad value names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import ConfigError, load_settings, parse_settings

ROOT = Path(__file__).resolve().parents[1]
ROUTE = {"name": "r1", "teacher": {"model": "openai/gpt-4.1-mini"}}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_are_valid(path: Path) -> None:
    settings = load_settings(path)
    assert settings.route("clinc-intents") is not None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"routes": [ROUTE], "sotre": {}}, "sotre: unknown key"),
        ({"routes": [{**ROUTE, "ood_treshold": 0.3}]}, "routes.0.ood_treshold: unknown key"),
        ({"routes": [{**ROUTE, "shadow_rate": 2}]}, "routes.0.shadow_rate"),
        ({"routes": [{**ROUTE, "mode": "maybe"}]}, "routes.0.mode"),
        ({"routes": [{**ROUTE, "name": "bad name!"}]}, "routes.0.name"),
        ({"routes": [ROUTE, ROUTE]}, "duplicate route names: r1"),
        ({"routes": []}, "at least one route"),
        ({"routes": [{"name": "r1"}]}, "routes.0.teacher: Field required"),
        ([], "top level must be a mapping"),
    ],
)
def test_invalid_configs_name_the_problem(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_settings(data)
    assert message in str(error.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("routes: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(broken)


def test_secrets_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = parse_settings({"routes": [{**ROUTE, "teacher": {"model": "m", "api_key_env": "MY_TEACHER_KEY"}}]})
    assert settings.routes[0].teacher.api_key() is None
    monkeypatch.setenv("MY_TEACHER_KEY", "sk-123")
    monkeypatch.setenv("DISTILLGATE_API_KEYS", " a, b ,,")
    assert settings.routes[0].teacher.api_key() == "sk-123"
    assert settings.auth.client_keys() == ["a", "b"]
