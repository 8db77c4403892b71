"""Deployment configuration: one YAML file, validated strictly.

Our own config uses ``extra="forbid"`` so a typo in a key is an error naming that key.
Secrets never live in the file: it names environment variables that hold them.
"""

from __future__ import annotations

import os
import re
import sys
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ROUTE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RouteMode(str, Enum):
    auto = "auto"
    teacher_only = "teacher_only"
    student_only = "student_only"
    shadow = "shadow"


class Prices(StrictModel):
    """Dollars per million tokens. Unset teacher prices fall back to litellm's cost map."""

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


class ServerConfig(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_body_bytes: int = Field(1_048_576, gt=0)
    max_tokens_limit: int = Field(32_768, gt=0)


class ClientKeyConfig(StrictModel):
    """One client key with a policy (gateway/keys.py): the routes it may use, its rate."""

    key_env: str = Field(min_length=1, description="environment variable holding the key")
    routes: list[str] | None = Field(None, description="route names this key may use; unset = all")
    requests_per_minute: float | None = Field(None, gt=0)
    burst: int | None = Field(None, ge=1, description="requests at once; default a minute's worth")


class AuthConfig(StrictModel):
    # Comma-separated bearer keys for clients. When the variable is unset or empty (and no
    # ``keys`` are configured) the OpenAI surface is open: a loopback-only development gateway.
    client_keys_env: str = "DISTILLGATE_API_KEYS"
    admin_token_env: str = "DISTILLGATE_ADMIN_TOKEN"
    keys: list[ClientKeyConfig] = []

    def client_keys(self) -> list[str]:
        raw = os.environ.get(self.client_keys_env, "")
        return [key.strip() for key in raw.split(",") if key.strip()]

    def admin_token(self) -> str | None:
        return os.environ.get(self.admin_token_env) or None


class SpoolConfig(StrictModel):
    """The request log's write-ahead spool (see gateway/store/spool.py)."""

    enabled: bool = True
    # Default: ``<store path>.spool/`` beside the database.
    dir: Path | None = None
    # fsync each append: survives an OS crash too, at one fsync per request.
    fsync: bool = False
    segment_mb: float = Field(16.0, gt=0)


class StoreConfig(StrictModel):
    kind: str = Field("sqlite", pattern="^sqlite$")
    path: Path = Path("var/distillgate.db")
    batch_size: int = Field(128, gt=0)
    flush_interval_s: float = Field(0.05, gt=0)
    queue_max: int = Field(10_000, gt=0)
    # How long a write waits for a lock held by another connection before it fails (and is retried).
    busy_timeout_ms: int = Field(5_000, ge=0)
    spool: SpoolConfig = SpoolConfig()

    def spool_dir(self) -> Path:
        return self.spool.dir or self.path.with_name(self.path.name + ".spool")


class BreakerConfig(StrictModel):
    """The student server's circuit breaker (see gateway/upstream/breaker.py)."""

    enabled: bool = True
    # Consecutive student failures (error, timeout, malformed answer) that open the breaker.
    failure_threshold: int = Field(5, ge=1)
    probe_interval_s: float = Field(2.0, gt=0)
    probe_timeout_s: float = Field(5.0, gt=0)


class VLLMConfig(StrictModel):
    """The student server. ``launch`` starts it as a child of ``distillgate serve``."""

    url: str = "http://127.0.0.1:8100"
    launch: bool = True
    python: Path = Path(".venv-vllm/bin/python")
    model_dir: Path = Path("var/models/base")
    served_model_name: str = "base"
    max_model_len: int = 512
    max_lora_rank: int = 128  # >= training.lora_rank; vLLM 0.32 accepts 1,8,16,32,64,128,256,320,512
    max_loras: int = 2
    extra_args: list[str] = []
    breaker: BreakerConfig = BreakerConfig()


class ReplayTeacherConfig(StrictModel):
    """The stand-in for the frontier API (no frontier API is reachable offline)."""

    launch: bool = True
    dataset: Path = Path("data/clinc150/data_full.json")
    port: int = Field(8200, ge=1, le=65535)
    latency_ms: float = Field(0.0, ge=0)
    latency_jitter_ms: float = Field(0.0, ge=0)
    error_rate: float = Field(0.0, ge=0, le=1)
    accuracy: float = Field(1.0, ge=0, le=1)
    seed: int = 0


class TeacherConfig(StrictModel):
    model: str = Field(description="litellm model id, e.g. openai/gpt-4.1-mini")
    api_base: str | None = None
    api_key_env: str | None = None
    fallback_model: str | None = None
    # Where the fallback model lives; unset means the same api_base / key as the main model.
    fallback_api_base: str | None = None
    fallback_api_key_env: str | None = None
    timeout_s: float = Field(30.0, gt=0)
    max_retries: int = Field(2, ge=0, le=10)
    backoff_base_s: float = Field(0.2, ge=0)
    params: dict[str, Any] = {}
    prices: Prices | None = None

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def endpoint(self, model: str) -> tuple[str | None, str | None]:
        """(api_base, api_key) for ``model``: the fallback's own when it names them."""
        if model == self.fallback_model and model != self.model:
            api_base = self.fallback_api_base or self.api_base
            key_env = self.fallback_api_key_env or self.api_key_env
            return api_base, os.environ.get(key_env) if key_env else None
        return self.api_base, self.api_key()


class StudentConfig(StrictModel):
    base_model: str = "var/models/base"
    system_prompt: str = ""
    timeout_s: float = Field(10.0, gt=0)
    # What a student token costs to serve (hardware amortised); used for the savings figure.
    prices: Prices = Prices(input_per_mtok=0.0, output_per_mtok=0.0)
    # Served without any adapter: for smoke tests of the student path before training.
    serve_base_model: bool = False
    # When distillgate builds the base itself (init-student): causal-LM steps on unlabelled
    # prompts, so the LoRA adapters start from a model that has read the route's language.
    # bench/train.py, 3,000 CLINC150 examples: held-out agreement 0.49 after 400 steps, 0.57
    # after 2,000 (about 3 minutes on 2 CPU cores, once).
    pretrain_steps: int = Field(2000, ge=0)


class TrainingConfig(StrictModel):
    min_new_examples: int = Field(200, ge=1)
    interval_minutes: float = Field(10.0, gt=0)
    holdout_fraction: float = Field(0.1, gt=0, lt=1)
    # Tuned for the locally built base (bench/train.py): full fine-tuning exported as a
    # rank-128 LoRA adapter; vllm.max_lora_rank must be at least lora_rank.
    method: str = Field("full", pattern="^(full|lora)$")
    epochs: float = Field(10.0, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    lora_rank: int = Field(128, ge=1)
    # Continual training: start from the live version, train on the new answers plus
    # replay_ratio times as many older ones (false: retrain from the base on everything).
    warm_start: bool = True
    replay_ratio: float = Field(1.0, ge=0)
    warm_start_epochs: float = Field(4.0, gt=0)
    max_steps: int | None = None


class GateConfig(StrictModel):
    # served_agreement: agreement of the answers a cascade route would let the student serve.
    metric: str = Field("agreement", pattern="^(agreement|validity|served_agreement)$")
    minimum: float = Field(0.5, ge=0, le=1)
    tolerance: float = Field(0.01, ge=0, le=1)
    # With served_agreement: a candidate that would serve almost nothing proves nothing.
    min_served_share: float = Field(0.05, ge=0, le=1)


class RedactConfig(StrictModel):
    """Personal data removed from logged prompts (gateway/redact.py); upstream calls are unchanged."""

    emails: bool = False
    phones: bool = False
    cards: bool = False

    @property
    def enabled(self) -> bool:
        return self.emails or self.phones or self.cards


class RouteConfig(StrictModel):
    name: str
    mode: RouteMode = RouteMode.auto
    teacher: TeacherConfig
    student: StudentConfig = StudentConfig()
    labels_dataset: Path | None = Field(
        None, description="label route: valid answers are the labels in this CLINC150-format file"
    )
    ood_threshold: float = Field(0.5, ge=0)
    confidence_threshold: float | None = None
    shadow_rate: float = Field(0.0, ge=0, le=1)
    training: TrainingConfig = TrainingConfig()
    gate: GateConfig = GateConfig()
    redact: RedactConfig = RedactConfig()

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not ROUTE_NAME_PATTERN.match(name):
            raise ValueError("route names are 1-64 characters of letters, digits, '.', '_', '-'")
        return name


class Settings(StrictModel):
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    store: StoreConfig = StoreConfig()
    vllm: VLLMConfig = VLLMConfig()
    replay_teacher: ReplayTeacherConfig | None = None
    routes: list[RouteConfig]

    @model_validator(mode="after")
    def _unique_routes(self) -> Settings:
        names = [route.name for route in self.routes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate route names: {', '.join(duplicates)}")
        if not names:
            raise ValueError("at least one route is required")
        unknown = sorted({route for key in self.auth.keys for route in key.routes or [] if route not in names})
        if unknown:
            raise ValueError(f"auth.keys names unknown routes: {', '.join(unknown)}")
        return self

    def route(self, name: str) -> RouteConfig | None:
        return next((route for route in self.routes if route.name == name), None)


def _format_validation_error(path: Path, error: ValidationError) -> str:
    lines = [f"invalid configuration in {path}:"]
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"  {location}: {message}")
    return "\n".join(lines)


def parse_settings(data: Any, source: Path = Path("<memory>")) -> Settings:
    """Validate an already-parsed mapping; raises ConfigError naming each bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid configuration in {source}: the top level must be a mapping")
    try:
        return Settings.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(source, error)) from None


def load_settings(path: str | Path) -> Settings:
    """Read and validate a YAML config file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"configuration file {path} is not valid YAML: {error}") from None
    return parse_settings(data, path)


def settings_for_command(path: str | Path, route: str | None = None) -> Settings | None:
    """Settings for a CLI command, or None after printing what is wrong (bad file, unknown route)."""
    try:
        settings = load_settings(path)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return None
    if route is not None and settings.route(route) is None:
        print(f"no route named {route!r} in {path}", file=sys.stderr)
        return None
    return settings
