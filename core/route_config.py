"""A route's configuration: its teacher, student, thresholds, training trigger, gate and
redaction. Part of the one YAML file (``core/config.py`` reads it); split out so each module
stays readable."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from core.answers import answer_key
from core.config_base import ROUTE_NAME_PATTERN, Prices, StrictModel
from core.modes import Mode

# litellm's prefix for OpenAI and OpenAI-compatible servers: such a teacher needs no translation.
OPENAI_PREFIX = "openai/"


class TeacherConfig(StrictModel):
    model: str = Field(description="litellm model id, e.g. openai/gpt-4.1-mini")
    # What carries the calls: auto = plain httpx when every model (the fallback's too) is
    # openai/... (OpenAI itself, or an OpenAI-compatible server at api_base), else litellm.
    client: Literal["auto", "httpx", "litellm"] = "auto"
    api_base: str | None = None
    api_key_env: str | None = None
    fallback_model: str | None = None
    # Where the fallback model lives; unset means the same api_base / key as the main model.
    fallback_api_base: str | None = None
    fallback_api_key_env: str | None = None
    timeout_s: float = Field(30.0, gt=0)
    max_retries: int = Field(2, ge=0, le=10)
    backoff_base_s: float = Field(0.2, ge=0)
    # A provider's retry-after is honoured up to this wait; a longer one (or one that would
    # pass the request's deadline) goes to the client as a 429 with that retry-after.
    max_retry_after_s: float = Field(20.0, ge=0)
    # Concurrent calls to this teacher (streams hold a slot until they end); beyond it a call
    # waits up to queue_timeout_s for a slot, then the client gets 503 with retry-after.
    max_concurrency: int = Field(64, ge=1)
    queue_timeout_s: float = Field(10.0, ge=0)
    params: dict[str, Any] = {}
    prices: Prices | None = None
    # /v1/embeddings on this route (forwarded, not distilled): a litellm embedding model id on
    # the same provider (api_base, key); unset = the route serves no embeddings.
    embedding_model: str | None = None
    embedding_input_per_mtok: float | None = Field(None, ge=0, description="unset: litellm's price map")

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def models(self) -> list[str]:
        """The main model, then the fallback when there is one."""
        return [self.model] + ([self.fallback_model] if self.fallback_model else [])

    def resolved_client(self) -> Literal["httpx", "litellm"]:
        """The client that carries this teacher's chat calls (``client`` with auto resolved)."""
        if self.client != "auto":
            return self.client
        return "httpx" if all(model.startswith(OPENAI_PREFIX) for model in self.models()) else "litellm"

    @model_validator(mode="after")
    def _httpx_needs_openai_wire(self) -> TeacherConfig:
        if self.client == "httpx":
            for model in self.models():
                api_base = (self.fallback_api_base if model == self.fallback_model else None) or self.api_base
                if not model.startswith(OPENAI_PREFIX) and not api_base:
                    raise ValueError(f"client httpx speaks OpenAI's wire format only: {model!r} is neither "
                                     f"openai/... nor served at an api_base (use client auto or litellm)")
        return self

    def endpoint(self, model: str) -> tuple[str | None, str | None]:
        """(api_base, api_key) for ``model``: the fallback's own when it names them."""
        if model == self.fallback_model and model != self.model:
            api_base = self.fallback_api_base or self.api_base
            key_env = self.fallback_api_key_env or self.api_key_env
            return api_base, os.environ.get(key_env) if key_env else None
        return self.api_base, self.api_key()


class StudentConfig(StrictModel):
    # Unset: the model vLLM serves (``vllm.model_dir``), the one place the base is named.
    # Adapters are trained on this base and loaded onto the served one, so the two must agree.
    base_model: str | None = None
    system_prompt: str = ""
    timeout_s: float = Field(10.0, gt=0)
    # What a student token costs to serve (hardware amortised); used for the savings figure.
    prices: Prices = Prices(input_per_mtok=0.0, output_per_mtok=0.0)
    # Served without any adapter: for smoke tests of the student path before training.
    serve_base_model: bool = False
    # When distillgate builds the base itself (init-student): causal-LM steps on unlabelled
    # prompts. It lifted the old 128-wide random base (0.49 -> 0.57 held-out agreement at 3,000
    # examples); the 384-wide base starts from MiniLM's token embeddings instead, and every
    # figure of its learning curve was measured without pretraining, which would cost many
    # minutes of a 2-core machine's first start at this width. Opt in with a number of steps.
    pretrain_steps: int = Field(0, ge=0)


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
    # A candidate is evaluated (and its threshold calibrated) on at least this many answers:
    # the holdout, topped up with the newest answers logged while it trained, which it never
    # saw (the next cycle trains on them). A young route's holdout is a few dozen answers: a
    # first version passed the gate on 17 served ones, then served 4.3 points below the
    # teacher, and later candidates better than live on every figure were refused at 0.87-0.89
    # on ~50. 0: the holdout only.
    min_evaluation_examples: int = Field(1000, ge=0)
    # Rows whose request carries a client system/developer message: "skip" them (default),
    # or "replace" that message by the route's student prompt as serving does. A client's
    # system prompt steers the teacher, so with "replace" a key could plant answers; choose
    # it only when every key trusted for training sends the app's own fixed prompt.
    client_system_prompts: Literal["skip", "replace"] = "skip"


class GateConfig(StrictModel):
    # served_agreement: agreement of the answers a cascade route would let the student serve.
    metric: str = Field("agreement", pattern="^(agreement|validity|served_agreement)$")
    minimum: float = Field(0.5, ge=0, le=1)
    tolerance: float = Field(0.01, ge=0, le=1)
    # With served_agreement: a candidate that would serve almost nothing proves nothing.
    min_served_share: float = Field(0.05, ge=0, le=1)


@lru_cache(maxsize=64)
def _keys(answers: tuple[str, ...]) -> frozenset[str]:
    return frozenset(answer_key(answer) for answer in answers)


class CascadeConfig(StrictModel):
    """How a cascade route decides, per answer, whether the student's answer is served.

    With ``target_agreement`` each trained version gets its own ``confidence_threshold``,
    calibrated on the holdout: the lowest score at which the answers it would serve agree
    with the teacher at least this often (the gate judges that threshold on held-out folds).
    A fixed threshold fits no version for long: the same -0.01 served 0 % of one version's
    answers and 15 % of the next's (CLINC150, 1,000 answers). Unset: the route's fixed
    ``confidence_threshold`` for every version.
    """

    target_agreement: float | None = Field(None, gt=0, le=1)
    # Unset: the threshold's served holdout answers agree >= target_agreement (point estimate).
    # Set (e.g. 0.75): their one-sided Clopper-Pearson lower bound at this confidence does;
    # safer where holdouts are small, but a young version may get no threshold at all.
    calibration_confidence: float | None = Field(None, gt=0, lt=1)
    # The teacher's answers to this many nearest training prompts vote on the student's
    # answer (kNN detector only); each dissent costs disagreement_penalty / neighbours.
    neighbours: int = Field(5, ge=1, le=50)
    disagreement_penalty: float = Field(0.0, ge=0, le=10, allow_inf_nan=False)
    # The student's ways of saying "not mine" (e.g. an intent route's `oos`): such an answer is
    # never served, whatever its score; the teacher answers instead. The student learns them
    # from the teacher's own answers, so it spots some out-of-scope prompts the OOD detector
    # let through (full demo: 20 of the 69 `oos_test` prompts the student served).
    escalate_answers: list[str] = Field(default_factory=list, max_length=100)
    # Prompts the teacher answered with an escalate answer: True keeps them in the OOD detector's
    # bank for the neighbours' vote only, out of its score (a better detector alone: far-OOD AUROC
    # +0.006-0.022); False (default) scores them too. Off: in three full demos with it on, held-out
    # out-of-scope prompts sent to the teacher fell from 0.952-0.955 to 0.935-0.944 (README).
    mask_escalated_prompts: bool = False

    @field_validator("escalate_answers")
    @classmethod
    def _escalate_answers_not_blank(cls, answers: list[str]) -> list[str]:
        if any(not answer.strip() for answer in answers):
            raise ValueError("escalate_answers: an answer must not be blank")
        return answers

    def escalates(self, answer: str) -> bool:
        """Whether the student's ``answer`` is one it must hand to the teacher (compared under
        the one answer normaliser, so case and spacing do not matter)."""
        return bool(self.escalate_answers) and answer_key(answer) in _keys(tuple(self.escalate_answers))


class LearnedRouterConfig(StrictModel):
    """A learned veto before the student answers (router/learned.py): a logistic regression on
    the prompt's embedding and OOD score predicting whether this version agrees with the
    teacher, trained each cycle on the candidate's own holdout answers and swapped in with it.

    Off by default: on CLINC150 it added nothing consistent to the cascade at equal served
    agreement (README, "The learned router"). Trained and swapped in whether or not it is
    enabled (it costs one embedding of the holdout), so enabling it needs no retraining.
    ``min_pairs``: fewer holdout answers than this (or only one class) and the version ships
    without one, and its training run says why.
    """

    enabled: bool = False
    # The request goes to the teacher when the predicted agreement is below this.
    min_agree: float = Field(0.5, gt=0, lt=1, allow_inf_nan=False)
    min_pairs: int = Field(100, ge=10)


class DriftConfig(StrictModel):
    """How far recent traffic may move from the live version's training prompts before a
    training cycle starts early (router/drift.py has the statistics).

    Always tracked (metrics, dashboard, admin API); a trigger only where a maximum is set, so
    that by default no cycle starts sooner than ``training.min_new_examples`` would start it.
    """

    window: int = Field(500, ge=10, description="the last N scored requests of the live version")
    # No verdict on fewer scores than this: 20 requests above the threshold out of 40 is noise.
    min_requests: int = Field(200, ge=1)
    # Share of the window above the route's ood_threshold (what the teacher answers because
    # the student does not know it).
    max_ood_share: float | None = Field(None, gt=0, le=1)
    # Share of the window above the 95th percentile of the detector's training scores: ~0.05
    # while traffic looks like the training prompts, whatever the threshold.
    max_novel_share: float | None = Field(None, gt=0, le=1)
    # An early cycle still needs this many new teacher answers since the last run.
    min_new_examples: int = Field(50, ge=1)
    cooldown_minutes: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _window_holds_min_requests(self) -> DriftConfig:
        if self.min_requests > self.window:
            raise ValueError(f"min_requests {self.min_requests} is above window {self.window}: it could never be met")
        return self

    @property
    def triggers(self) -> bool:
        return self.max_ood_share is not None or self.max_novel_share is not None


class RolloutConfig(StrictModel):
    """How a candidate that passed the gate reaches its route's traffic (router/canary.py
    has the test; gateway/training/canary.py runs it).

    ``canary_share`` unset or 0: the candidate is hot-swapped to all of the route's student
    traffic in one step. Above 0: it first serves that share of the student-eligible requests
    beside the live version; both are shadowed, and a sequential Clopper-Pearson test on
    their agreement with the teacher promotes it, or rolls it back, or times out.
    """

    canary_share: float = Field(0.0, ge=0, lt=1)
    # Canary-served answers re-asked of the teacher: 1.0 so that evidence comes fast.
    shadow_rate: float = Field(1.0, gt=0, le=1)
    # Live-served answers re-asked while a canary runs; unset: as many as the canary gets
    # (shadow_rate x share / (1 - share)), never fewer than the route's own shadow_rate.
    live_shadow_rate: float | None = Field(None, ge=0, le=1)
    # Shadow comparisons each arm needs before a look; looks come every min_evidence more
    # canary comparisons, look k at confidence 1 - (1 - confidence) / (k (k + 1)), so that
    # all looks together are wrong with probability at most 1 - confidence.
    min_evidence: int = Field(30, ge=1)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    # "Not worse": the canary's agreement may sit this far below live's.
    tolerance: float = Field(0.05, ge=0, le=1)
    # At time-out the point estimates decide (see gateway/training/canary.py).
    max_duration_minutes: float = Field(60.0, gt=0)
    # Thumbs-down or a score below 0.5 on canary answers: at least this many, and a share of
    # the canary's served answers above live's share plus the margin, rolls the canary back.
    min_negative_feedback: int = Field(3, ge=1)
    negative_feedback_margin: float = Field(0.02, ge=0, le=1)
    seed: int = 0  # the traffic split is a hash of (seed, request id): reproducible

    @property
    def enabled(self) -> bool:
        return self.canary_share > 0


class RedactConfig(StrictModel):
    """Personal data and secrets removed from every logged string (gateway/redact.py): request,
    answer, error text, shadow rows; so never trained on. Upstream calls are unchanged."""

    # API keys (sk-..., AKIA..., ghp_..., AIza..., xox?-...): on by default, never worth keeping.
    secrets: bool = True
    ibans: bool = False
    emails: bool = False
    phones: bool = False
    cards: bool = False

    @property
    def enabled(self) -> bool:
        return self.secrets or self.ibans or self.emails or self.phones or self.cards


LABEL_DETECTORS = ("knn_lda", "knn_tuned")  # learn from the teacher's labels (labels_dataset)


class RouteConfig(StrictModel):
    name: str
    mode: Mode = Mode.auto
    teacher: TeacherConfig
    student: StudentConfig = StudentConfig()
    labels_dataset: Path | None = Field(
        None, description="label route: valid answers are the labels in this CLINC150-format file"
    )
    # The detector fixes the unit of ``ood_threshold`` (knn: cosine distance to the nearest
    # training prompts; mahalanobis: squared distance), so both live on the route.
    # knn_tuned also tunes the static embedder's token table to the labels (router/tuned.py).
    ood_detector: str = Field("knn", pattern="^(knn|knn_lda|knn_tuned|mahalanobis)$")
    ood_threshold: float = Field(0.5, ge=0, allow_inf_nan=False)
    # A mean token logprob (<= 0); None turns the cascade off.
    confidence_threshold: float | None = Field(None, le=0, allow_inf_nan=False)
    cascade: CascadeConfig = CascadeConfig()
    learned_router: LearnedRouterConfig = LearnedRouterConfig()
    shadow_rate: float = Field(0.0, ge=0, le=1)
    training: TrainingConfig = TrainingConfig()
    drift: DriftConfig = DriftConfig()
    gate: GateConfig = GateConfig()
    redact: RedactConfig = RedactConfig()
    rollout: RolloutConfig = RolloutConfig()

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not ROUTE_NAME_PATTERN.match(name):
            raise ValueError("route names are 1-64 characters of letters, digits, '.', '_', '-'")
        return name

    @model_validator(mode="after")
    def _label_detectors_need_labels(self) -> RouteConfig:
        # Without the teacher's labels these detectors are plain knn, whose distances are longer:
        # a threshold chosen for them would silently send most in-scope prompts to the teacher.
        if self.ood_detector in LABEL_DETECTORS and self.labels_dataset is None:
            raise ValueError(
                f"ood_detector {self.ood_detector} learns from the teacher's labels and this route has no "
                f"labels_dataset: without one it would score as knn, in another unit of ood_threshold "
                f"(knn keeps at 0.5 what knn_tuned keeps at 0.39-0.41); set labels_dataset, or ood_detector: knn")
        return self
