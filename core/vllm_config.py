"""The student's vLLM servers: where they are, how they are launched, guarded and supervised."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from core.config_base import StrictModel


class BreakerConfig(StrictModel):
    """The student server's circuit breaker (see gateway/upstream/breaker.py)."""

    enabled: bool = True
    # Consecutive student server faults (5xx, timeout, connection error, malformed answer)
    # that open the breaker; a 4xx (the request's fault) never counts.
    failure_threshold: int = Field(5, ge=1)
    probe_interval_s: float = Field(2.0, gt=0)
    probe_timeout_s: float = Field(5.0, gt=0)
    # Half-open admits one trial request; one that never reports back frees the slot after this.
    trial_timeout_s: float = Field(30.0, gt=0)


class SuperviseConfig(StrictModel):
    """Restarting a vLLM that ``serve`` launched (see gateway/vllm_supervisor.py)."""

    enabled: bool = True
    poll_interval_s: float = Field(1.0, gt=0)
    backoff_initial_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(60.0, ge=0)
    # A server that stayed up this long resets the backoff.
    stable_after_s: float = Field(60.0, ge=0)
    ready_timeout_s: float = Field(300.0, gt=0)


class VLLMConfig(StrictModel):
    """The student's servers. ``launch`` starts one as a child of ``distillgate serve``.

    ``url`` names one server; ``urls`` several, each serving the same base model (requests
    are balanced across them, each has its own breaker, a hot swap loads every adapter on
    all of them: gateway/upstream/pool.py). ``url`` is then the first of ``urls``.
    """

    url: str = "http://127.0.0.1:8100"
    urls: list[str] | None = None
    launch: bool = True
    python: Path = Path(".venv-vllm/bin/python")
    model_dir: Path = Path("var/models/base")
    served_model_name: str = "base"
    max_model_len: int = 512
    max_lora_rank: int = 128  # >= training.lora_rank; vLLM 0.32 accepts 1,8,16,32,64,128,256,320,512
    max_loras: int = 2
    extra_args: list[str] = []
    breaker: BreakerConfig = BreakerConfig()
    supervise: SuperviseConfig = SuperviseConfig()

    @model_validator(mode="after")
    def _servers(self) -> VLLMConfig:
        if self.urls is None:
            self.urls = [self.url]
        elif "url" in self.model_fields_set and self.urls and self.url != self.urls[0]:
            raise ValueError("set vllm.url (one server) or vllm.urls (several), not both")
        if not self.urls:
            raise ValueError("vllm.urls is empty: name at least one server")
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"vllm.urls: {url!r} is not an http(s) URL")
        normalised = [url.rstrip("/") for url in self.urls]
        if len(set(normalised)) != len(normalised):
            raise ValueError("vllm.urls names a server more than once")
        if self.launch and len(normalised) > 1:
            raise ValueError("vllm.launch starts one server; with several vllm.urls run them yourself "
                             "and set vllm.launch: false")
        self.url = self.urls[0]  # what ``launch`` starts and single-server tools read
        return self

    @property
    def server_urls(self) -> list[str]:
        return list(self.urls or [self.url])
