"""Deployment configuration: one YAML file, validated strictly.

Our own config uses ``extra="forbid"`` so a typo in a key is an error naming that key.
Secrets never live in the file: it names environment variables that hold them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from core.config_base import REPLAY_TEACHER_MODEL, ConfigError, Prices, StrictModel
from core.route_config import (
    CascadeConfig,
    GateConfig,
    LearnedRouterConfig,
    RedactConfig,
    RouteConfig,
    StudentConfig,
    TeacherConfig,
    TrainingConfig,
)
from core.vllm_config import BreakerConfig, SuperviseConfig, VLLMConfig


class ServerConfig(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Every route's request body (413 beyond it, before it is read whole).
    max_body_bytes: int = Field(1_048_576, gt=0)
    max_tokens_limit: int = Field(32_768, gt=0)
    # One chat request from start to its last byte, streams and teacher retries included (504).
    request_timeout_s: float = Field(300.0, gt=0)
    # Slow clients: the request line and headers must arrive within header_timeout_s of the
    # connection (or of the request's first byte), the body within body_timeout_s of waiting (408).
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    # uvicorn's limit_concurrency: connections plus tasks beyond it get 503 at once.
    limit_concurrency: int = Field(1024, ge=1)
    keep_alive_s: int = Field(5, ge=1)


class ClientKeyConfig(StrictModel):
    """One client key with a policy (gateway/keys.py): the routes it may use, its rate."""

    key_env: str = Field(min_length=1, description="environment variable holding the key")
    routes: list[str] | None = Field(None, description="route names this key may use; unset = all")
    requests_per_minute: float | None = Field(None, gt=0)
    burst: int | None = Field(None, ge=1, description="requests at once; default a minute's worth")
    # Only rows from keys trusted for training become training data: any other key could
    # plant answers that the student would then serve to everyone (trainer/dataset.py).
    trusted_for_training: bool = False
    # Spend per calendar month (UTC): the sum of the key's requests' cost_usd. Once it is
    # reached, ``over_budget`` says what happens (gateway/budgets.py; unset: refuse).
    monthly_budget_usd: float | None = Field(None, gt=0, description="dollars per calendar month (UTC)")
    over_budget: Literal["student_only", "refuse"] | None = None

    @property
    def over_budget_action(self) -> Literal["student_only", "refuse"]:
        return self.over_budget or "refuse"

    @model_validator(mode="after")
    def _budget_action_needs_budget(self) -> ClientKeyConfig:
        # An over_budget with no budget would silently never apply: say so.
        if self.over_budget is not None and self.monthly_budget_usd is None:
            raise ValueError(f"key {self.key_env}: over_budget is set but monthly_budget_usd is not; "
                             "set a monthly_budget_usd or remove over_budget")
        return self


class AuthConfig(StrictModel):
    # Comma-separated bearer keys for clients. When the variable is unset or empty (and no
    # ``keys`` are configured) the OpenAI surface is open: a loopback-only development gateway.
    client_keys_env: str = "DISTILLGATE_API_KEYS"
    admin_token_env: str = "DISTILLGATE_ADMIN_TOKEN"
    keys: list[ClientKeyConfig] = []
    # Whether rows from the keys in ``client_keys_env`` (no per-key policy) are trained on.
    client_keys_trusted_for_training: bool = False
    # Whether rows of an open gateway (no client keys at all: loopback development) are
    # trained on. ``serve`` refuses an open gateway beyond loopback unless --insecure.
    anonymous_trusted_for_training: bool = True

    # Where ``serve`` writes the admin token it generates (mode 0600) when the variable is
    # unset; the CLI's admin commands read it there. Default: ``admin-token`` beside the store.
    admin_token_file: Path | None = None
    # Dashboard sign-in sessions (server-side; sign-out and POST /admin/sessions/revoke end them).
    session_ttl_s: float = Field(8 * 3600, gt=0)
    session_idle_s: float = Field(30 * 60, gt=0)
    # Sign-in attempts per client address per minute (and 6x that from all addresses together).
    sign_in_per_minute: float = Field(5, gt=0)

    def client_keys(self) -> list[str]:
        raw = os.environ.get(self.client_keys_env, "")
        return [key.strip() for key in raw.split(",") if key.strip()]

    def admin_token(self, token_file: Path | None = None) -> str | None:
        """The admin token: its environment variable, else the file ``serve`` wrote."""
        token = os.environ.get(self.admin_token_env)
        if token:
            return token
        path = token_file or self.admin_token_file
        if path is not None and path.is_file():
            return path.read_text().strip() or None
        return None


RATE_LIMIT_SCHEMES = ("redis://", "rediss://", "redis+unix://")


class RateLimitConfig(StrictModel):
    """Where the per-key rate-limit buckets live (gateway/rate_limits.py)."""

    # Unset: in this process (each ``serve`` replica enforces the whole limit on its own).
    # A Redis URL (redis://host:6379/0, rediss:// for TLS): one budget shared by every replica.
    # ``storage_env`` names a variable holding the URL instead, for a URL with a password.
    storage: str | None = None
    storage_env: str | None = None
    # When Redis cannot be reached: ``allow`` serves the request unlimited (fail open),
    # ``refuse`` answers 503 (fail closed). Either way it is logged and counted in /metrics.
    on_storage_error: Literal["allow", "refuse"] = "allow"
    # Connect and command timeout: a Redis that hangs delays each limited request this long at most.
    timeout_s: float = Field(0.25, gt=0)

    @model_validator(mode="after")
    def _one_storage(self) -> RateLimitConfig:
        if self.storage is not None and self.storage_env is not None:
            raise ValueError("set rate_limit.storage or rate_limit.storage_env, not both")
        if self.storage is not None:
            check_redis_url(self.storage)
        return self

    def storage_url(self) -> str | None:
        """The Redis URL, or None for in-process buckets."""
        url = os.environ.get(self.storage_env, "").strip() if self.storage_env else self.storage
        if self.storage_env and not url:
            raise ConfigError(f"rate_limit.storage_env names {self.storage_env}, which is not set")
        if url:
            check_redis_url(url)
        return url or None


def check_redis_url(url: str) -> None:
    if not url.startswith(RATE_LIMIT_SCHEMES):
        raise ValueError(f"rate_limit storage must be a Redis URL ({', '.join(RATE_LIMIT_SCHEMES)}); "
                         f"got one starting {url.split(':', 1)[0]!r}")


class SpoolConfig(StrictModel):
    """The request log's write-ahead spool (see gateway/store/spool.py)."""

    enabled: bool = True
    # Default: ``<store path>.spool/`` beside the database.
    dir: Path | None = None
    # fsync each append: survives an OS crash too, at one fsync per request.
    fsync: bool = False
    segment_mb: float = Field(16.0, gt=0)


class StoreConfig(StrictModel):
    # sqlite: the embedded default, one file at ``path``. postgres: a server database shared by
    # several gateway replicas, reached with the DSN held by the environment variable
    # ``dsn_env`` (a secret: never in this file).
    kind: Literal["sqlite", "postgres"] = "sqlite"
    # With postgres, ``path`` still places this replica's spool, dead-letter file and admin
    # token file (see spool_dir and dead_letter_file): they are per process, not shared.
    path: Path = Path("var/distillgate.db")
    # Where training writes each version's adapter, detector and learned router; the versions
    # in the store point into it (relative: to the working directory). The demo keeps its own.
    adapters_dir: Path = Path("var/adapters")
    dsn_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    pool_min_size: int = Field(1, ge=0)
    pool_max_size: int = Field(10, ge=1)
    # How long startup waits for the database, and a request for a free pooled connection.
    connect_timeout_s: float = Field(10.0, gt=0)
    pool_timeout_s: float = Field(5.0, gt=0)
    batch_size: int = Field(128, gt=0)
    flush_interval_s: float = Field(0.05, gt=0)
    queue_max: int = Field(10_000, gt=0)
    # How long a write waits for a lock held by another connection before it fails (and is retried).
    busy_timeout_ms: int = Field(5_000, ge=0)
    # How often a replica reads the routes' overrides and live versions back from the store, to
    # apply what another replica (sharing the store) changed: admin PATCHes, promotions, rollbacks.
    sync_interval_s: float = Field(2.0, gt=0)
    spool: SpoolConfig = SpoolConfig()
    # Rows the store refuses for what they hold (poison rows), one JSON line each.
    # Default: ``<store path>.deadletter.jsonl`` beside the database.
    dead_letter_path: Path | None = None
    # Requests and shadow rows older than this are deleted (``distillgate purge``, and hourly
    # inside ``serve``); unset keeps them for ever. Training only sees what is kept.
    retention_days: float | None = Field(None, gt=0)
    purge_interval_s: float = Field(3600.0, gt=0)

    @model_validator(mode="after")
    def _postgres_needs_a_dsn(self) -> StoreConfig:
        if self.kind == "postgres" and not self.dsn_env:
            raise ValueError("store.kind postgres needs store.dsn_env: the name of the environment variable "
                             "holding the DSN (e.g. DISTILLGATE_PG_DSN)")
        if self.pool_min_size > self.pool_max_size:
            raise ValueError("store.pool_min_size is larger than store.pool_max_size")
        return self

    def dsn(self) -> str:
        """The PostgreSQL DSN from the environment; ConfigError naming the variable when unset."""
        value = os.environ.get(self.dsn_env or "", "").strip()
        if not value:
            raise ConfigError(f"store.kind is postgres but the environment variable {self.dsn_env} "
                              "(store.dsn_env) holding its DSN is not set")
        return value

    def spool_dir(self) -> Path:
        return self.spool.dir or self.path.with_name(self.path.name + ".spool")

    def dead_letter_file(self) -> Path:
        return self.dead_letter_path or self.path.with_name(self.path.name + ".deadletter.jsonl")


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


class RouterConfig(StrictModel):
    """The router's embedder (router/encoders.py), built locally from the packaged MiniLM.

    ``static``: a model2vec static model distilled from MiniLM (no torch at request time,
    ~0.05 ms a prompt); ``onnx``: MiniLM exported to ONNX, int8, run by onnxruntime;
    ``minilm``: the transformer itself under sentence-transformers (torch). A detector
    remembers the embedder it was fitted with; the gateway refuses one fitted with another.
    """

    embedder: Literal["minilm", "static", "onnx"] = "static"
    # Where `distillgate init-router` (and serve's first start) writes the built embedders.
    artifacts_dir: Path = Path("var/models/router")
    # Embedding cache: keyed by a hash of what the embedder reads, capped in bytes.
    cache_mb: float = Field(8.0, ge=0)


class CostsConfig(StrictModel):
    """What training compute costs, so savings can be reported net of it (``distillgate
    report``, the demo). Priced per hour of a training run's wall time on its machine; the
    student's serving cost is priced per token under each route's ``student.prices``."""

    # A 2-vCPU cloud machine (on-demand, late 2026), the size of this project's CI machine.
    training_per_cpu_hour: float = Field(0.10, ge=0)
    # One data-centre GPU (H100 class, on-demand).
    training_per_gpu_hour: float = Field(3.00, ge=0)

    def training_cost(self, seconds: float, device: str | None) -> float:
        """Dollars for ``seconds`` of training on ``device`` ("cuda…" is a GPU, anything else a CPU)."""
        per_hour = self.training_per_gpu_hour if (device or "").startswith("cuda") else self.training_per_cpu_hour
        return max(0.0, seconds) / 3600 * per_hour


class TracingConfig(StrictModel):
    """OpenTelemetry traces (gateway/tracing.py): off, and free, until an OTLP endpoint is set."""

    # The collector's OTLP/HTTP base URL (``/v1/traces`` is appended), e.g. http://127.0.0.1:4318.
    # Unset: the standard OTEL_EXPORTER_OTLP_ENDPOINT variable, else no tracing at all.
    otlp_endpoint: str | None = None
    service_name: str = Field("distillgate", min_length=1)
    # Share of requests traced (parent-based: a caller's sampled trace is always continued).
    sample_ratio: float = Field(1.0, ge=0, le=1)

    def endpoint(self) -> str | None:
        return self.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None


class Settings(StrictModel):
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    rate_limit: RateLimitConfig = RateLimitConfig()
    store: StoreConfig = StoreConfig()
    vllm: VLLMConfig = VLLMConfig()
    replay_teacher: ReplayTeacherConfig | None = None
    costs: CostsConfig = CostsConfig()
    router: RouterConfig = RouterConfig()
    tracing: TracingConfig = TracingConfig()
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
        envs = [key.key_env for key in self.auth.keys]
        repeated = sorted({env for env in envs if envs.count(env) > 1})
        if repeated:
            # Two policies (two budgets) for one key: which would apply is not obvious.
            raise ValueError(f"auth.keys names a key_env more than once: {', '.join(repeated)}")
        for route in self.routes:
            self._check_route(route)
        return self

    def _check_route(self, route: RouteConfig) -> None:
        """Cross-field facts: each is named once; a second mention must agree with the first."""
        served_base = str(self.vllm.model_dir)
        if route.student.base_model is None:
            route.student.base_model = served_base
        elif Path(route.student.base_model) != Path(served_base):
            raise ValueError(f"route {route.name}: student.base_model {route.student.base_model!r} differs from "
                             f"vllm.model_dir {served_base!r}; adapters must be trained on the base vLLM serves "
                             "(leave student.base_model unset)")
        if self.replay_teacher is not None and route.teacher.model == REPLAY_TEACHER_MODEL:
            replay_base = f"http://127.0.0.1:{self.replay_teacher.port}/v1"
            if route.teacher.api_base is None:
                route.teacher.api_base = replay_base
            elif self.replay_teacher.launch and route.teacher.api_base.rstrip("/") != replay_base:
                raise ValueError(f"route {route.name}: teacher.api_base {route.teacher.api_base!r} is not the "
                                 f"launched replay teacher ({replay_base}); leave it unset")
        if route.training.lora_rank > self.vllm.max_lora_rank:
            raise ValueError(f"route {route.name}: training.lora_rank {route.training.lora_rank} is above "
                             f"vllm.max_lora_rank {self.vllm.max_lora_rank}; vLLM would refuse every adapter")
        target = route.cascade.target_agreement
        if route.gate.metric == "served_agreement" and route.confidence_threshold is None and target is None:
            raise ValueError(f"route {route.name}: gate.metric served_agreement needs a confidence_threshold "
                             "or cascade.target_agreement (the cascade decides what the student would serve)")
        if route.gate.metric == "served_agreement" and target is not None and target < route.gate.minimum:
            raise ValueError(f"route {route.name}: cascade.target_agreement {target} is below gate.minimum "
                             f"{route.gate.minimum}; the gate would reject the versions it calibrates")

    def admin_token_file(self) -> Path:
        return self.auth.admin_token_file or self.store.path.with_name("admin-token")

    def admin_token(self) -> str | None:
        """The admin token from its variable or from the file ``serve`` wrote."""
        return self.auth.admin_token(self.admin_token_file())

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


__all__ = [
    "REPLAY_TEACHER_MODEL", "AuthConfig", "BreakerConfig", "CascadeConfig", "ClientKeyConfig", "ConfigError",
    "CostsConfig", "GateConfig", "LearnedRouterConfig", "Prices", "RateLimitConfig", "RedactConfig",
    "RouteConfig", "RouterConfig", "Settings", "StoreConfig", "StudentConfig", "SuperviseConfig", "TeacherConfig",
    "TracingConfig", "TrainingConfig", "VLLMConfig", "load_settings", "parse_settings", "settings_for_command",
]
