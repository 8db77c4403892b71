"""Config: strict for ourselves — a typo or a bad value names the key."""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.config import REPLAY_TEACHER_MODEL, ConfigError, load_settings, parse_settings

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
        ({"routes": [{**ROUTE, "teacher": {"model": "openai/m", "client": "requests"}}]}, "routes.0.teacher.client"),
        ({"routes": [{**ROUTE, "teacher": {"model": "anthropic/claude-sonnet-4", "client": "httpx"}}]},
         "client httpx speaks OpenAI's wire format only: 'anthropic/claude-sonnet-4'"),
        ({"routes": [ROUTE], "store": {"kind": "mysql"}}, "store.kind"),
        ({"routes": [ROUTE], "store": {"kind": "postgres"}}, "store.kind postgres needs store.dsn_env"),
        ({"routes": [ROUTE], "store": {"kind": "postgres", "dsn_env": "bad-name"}}, "store.dsn_env"),
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


@pytest.mark.parametrize(
    ("teacher", "client"),
    [
        ({"model": "openai/gpt-4.1-mini"}, "httpx"),  # OpenAI's API itself
        ({"model": "openai/replay-teacher", "api_base": "http://127.0.0.1:8200/v1"}, "httpx"),
        ({"model": "anthropic/claude-sonnet-4"}, "litellm"),
        ({"model": "bedrock/anthropic.claude-3", "api_base": "http://proxy/v1"}, "litellm"),
        ({"model": "openai/gpt-4.1-mini", "fallback_model": "anthropic/claude-sonnet-4"}, "litellm"),
        ({"model": "openai/gpt-4.1-mini", "client": "litellm"}, "litellm"),
        ({"model": "hosted_vllm/qwen", "api_base": "http://vllm/v1", "client": "httpx"}, "httpx"),
    ],
)
def test_teacher_client_is_chosen_per_route(teacher: dict[str, Any], client: str) -> None:
    settings = parse_settings({"routes": [{**ROUTE, "teacher": teacher}]})
    assert settings.routes[0].teacher.resolved_client() == client


def test_secrets_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = parse_settings({"routes": [{**ROUTE, "teacher": {"model": "m", "api_key_env": "MY_TEACHER_KEY"}}]})
    assert settings.routes[0].teacher.api_key() is None
    monkeypatch.setenv("MY_TEACHER_KEY", "sk-123")
    monkeypatch.setenv("DISTILLGATE_API_KEYS", " a, b ,,")
    assert settings.routes[0].teacher.api_key() == "sk-123"
    assert settings.auth.client_keys() == ["a", "b"]


def test_the_postgres_dsn_comes_from_the_named_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    data = {"routes": [ROUTE], "store": {"kind": "postgres", "dsn_env": "MY_PG_DSN"}}
    monkeypatch.delenv("MY_PG_DSN", raising=False)
    with pytest.raises(ConfigError, match="environment variable MY_PG_DSN"):
        parse_settings(data).store.dsn()
    config = tmp_path / "pg.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["report", "--config", str(config)]) == 2  # says why, no traceback
    assert "MY_PG_DSN" in capsys.readouterr().err
    monkeypatch.setenv("MY_PG_DSN", "postgresql://u@db/x")
    assert parse_settings(data).store.dsn() == "postgresql://u@db/x"


# -- configs/default.yaml says what the defaults say, except where a comment says why --------
def _leaves(node: yaml.Node, path: tuple[str | int, ...] = ()) -> list[tuple[tuple[str | int, ...], int]]:
    """(path, line) of every scalar in a composed YAML document."""
    if isinstance(node, yaml.MappingNode):
        return [leaf for key, value in node.value for leaf in _leaves(value, (*path, key.value))]
    if isinstance(node, yaml.SequenceNode) and path and path[-1] == "routes":
        return [leaf for index, item in enumerate(node.value) for leaf in _leaves(item, (*path, index))]
    return [(path, node.start_mark.line)]


def _without(data: Any, path: tuple[str | int, ...]) -> Any:
    copy = deepcopy(data)
    parent = copy
    for part in path[:-1]:
        parent = parent[part]
    del parent[path[-1]]
    return copy


def _value(settings: Any, path: tuple[str | int, ...]) -> Any:
    for part in path:
        settings = settings[part] if isinstance(part, int) else getattr(settings, part)
    return settings


def _commented(lines: list[str], line: int) -> bool:
    """A comment on the line itself or in the comment block right above it."""
    if "#" in lines[line]:
        return True
    return line > 0 and lines[line - 1].strip().startswith("#")


def test_default_yaml_equals_the_defaults_except_where_a_comment_says_why() -> None:
    path = ROOT / "configs" / "default.yaml"
    text = path.read_text()
    data, lines = yaml.safe_load(text), text.splitlines()
    full = parse_settings(data)
    unexplained = []
    for leaf, line in _leaves(yaml.compose(text)):
        try:
            default = parse_settings(_without(data, leaf))
        except ConfigError:
            continue  # a required value: there is no default to agree with
        if _value(default, leaf) != _value(full, leaf) and not _commented(lines, line):
            unexplained.append(f"{'.'.join(map(str, leaf))} (line {line + 1})")
    assert unexplained == []


def test_the_check_catches_an_unexplained_difference() -> None:
    text = "routes:\n  - name: r\n    teacher: {model: openai/x}\n    shadow_rate: 0.5\n"
    leaves = dict(_leaves(yaml.compose(text)))
    assert leaves[("routes", 0, "shadow_rate")] == 3
    assert not _commented(text.splitlines(), 3)


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"student": {"base_model": "elsewhere"}}, "differs from vllm.model_dir"),
        ({"gate": {"metric": "served_agreement"}}, "needs a confidence_threshold"),
        ({"training": {"lora_rank": 256}}, "above vllm.max_lora_rank 128"),
    ],
)
def test_cross_field_checks_name_both_fields(route: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_settings({"routes": [{**ROUTE, **route}]})


def test_facts_named_once_are_filled_in_where_they_are_used() -> None:
    settings = parse_settings({"vllm": {"model_dir": "var/models/m"}, "replay_teacher": {"port": 8321},
                               "routes": [{"name": "r", "teacher": {"model": REPLAY_TEACHER_MODEL}}]})
    route = settings.routes[0]
    assert route.student.base_model == "var/models/m"
    assert route.teacher.api_base == "http://127.0.0.1:8321/v1"
    with pytest.raises(ConfigError, match="not the launched replay teacher"):
        parse_settings({"replay_teacher": {"port": 8321}, "routes": [
            {"name": "r", "teacher": {"model": REPLAY_TEACHER_MODEL, "api_base": "http://127.0.0.1:9/v1"}}]})


def test_check_config_command_reports_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    assert main(["check-config", "--config", str(ROOT / "configs" / "default.yaml")]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes:\n  - name: r\n    teacher: {model: openai/x}\n    ood_treshold: 0.3\n")
    assert main(["check-config", "--config", str(bad)]) != 0
    assert "routes.0.ood_treshold: unknown key" in capsys.readouterr().err
