"""What a demo run does: traffic, its arrival rate, the replay teacher, the schedule.

The route itself (prices, thresholds, training and gate) comes from ``configs/default.yaml``:
the demo shows the default configuration at work and does not keep its own copy of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, model_validator

from harness.children import ROOT

# The drift trigger of the shift phase. Measured offline (static embedder, kNN detector fitted
# on 3,000 stream prompts, windows of 500, two seeds): novel_share 0.03-0.044 before the shift
# and 0.10-0.13 after two domains join; 0.08 sits ~4 standard deviations above the first.
# Versions trained on <= 1,000 answers sit at 0.07-0.11 before any shift: a shift should come
# after the student has seen a few thousand requests. One early cycle per 10 minutes.
SHIFT_DRIFT: dict[str, Any] = {"max_novel_share": 0.08, "cooldown_minutes": 10}


class DemoOptions(BaseModel):
    requests: int = Field(10_000, ge=10)
    quick: bool = False
    out: Path = Path("var/demo")
    config: Path = ROOT / "configs" / "default.yaml"
    dataset: Path = ROOT / "data" / "clinc150" / "data_full.json"
    concurrency: int = Field(16, ge=1)
    rate_per_s: float | None = Field(10.0, gt=0, description="arrival rate of the stream; None: as fast as possible")
    oos_rate: float = Field(0.1, ge=0, le=1)
    teacher_accuracy: float = Field(0.98, ge=0, le=1)
    teacher_latency_ms: float = 300.0
    phase_size: int = Field(1000, ge=1)
    heldout_limit: int | None = None
    # None: the route's own training.min_new_examples (the first cycle starts at that many
    # teacher answers: a few hundred, a minute into the stream at 10 requests/s).
    min_new_examples: int | None = Field(None, ge=1)
    # How often the scheduler checks for new answers (a count query, cheap). The default
    # config's 5 minutes would be 3,000 requests at 10/s between checks: the demo's stream
    # compresses a day of traffic, so it checks every 15 s and a cycle starts as soon as
    # min_new_examples answers are in.
    interval_minutes: float = Field(0.25, gt=0)
    shadow_rate: float | None = Field(None, ge=0, le=1, description="None: the route's own")
    seed: int = 0
    # The tool-calling route (harness/demo/tools_route.py), opt-in: its training runs share
    # the machine with the main route's.
    tools: bool = False
    tools_share: float = Field(0.1, gt=0, le=1, description="the tool stream's length and rate, per main request")
    tools_min_new_examples: int = Field(150, ge=1)
    # The app's in-scope intents: None, all of CLINC150's 150; else this many, chosen by seed
    # (a small app, as the shift test runs).
    intents: int | None = Field(None, ge=2)
    # The shift phase (issue 17): before request ``shift_at`` (1-based) the traffic holds back
    # ``shift_share`` of the intents (whole CLINC150 domains where they fit); from it on they
    # join the mix. None: no shift (the default: issue 11's goals were measured without one).
    shift_at: int | None = Field(None, ge=1)
    shift_share: float = Field(0.2, gt=0, lt=1)
    # Overrides of the route's ``drift`` section; None: SHIFT_DRIFT when there is a shift,
    # else the route's own (tracked, no trigger).
    drift: dict[str, Any] | None = None

    def drift_overrides(self) -> dict[str, Any] | None:
        if self.drift is not None:
            return self.drift
        return dict(SHIFT_DRIFT) if self.shift_at is not None else None

    @model_validator(mode="after")
    def _shift_within_stream(self) -> DemoOptions:
        if self.shift_at is not None and self.shift_at > self.requests:
            raise ValueError(f"shift_at {self.shift_at} is past the stream's {self.requests} requests")
        return self

    @classmethod
    def quick_defaults(cls, **overrides: Any) -> DemoOptions:
        # 2,000 requests paced at 3/s: a training cycle takes 1-1.5 minutes on a 2-core machine
        # that also runs vLLM and the gateway, and the first cycles (~300, ~650 answers) are
        # rejected by the gate; at 8/s the stream was over before the second one finished.
        quick = {"requests": 2000, "quick": True, "rate_per_s": 3.0, "phase_size": 500, "heldout_limit": 400,
                 "teacher_latency_ms": 150.0}
        return cls(**{**quick, **overrides})
