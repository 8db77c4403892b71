"""What a demo run does: traffic, its arrival rate, the replay teacher, the schedule.

The route itself (prices, thresholds, training and gate) comes from ``configs/default.yaml``:
the demo shows the default configuration at work and does not keep its own copy of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from harness.children import ROOT


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

    @classmethod
    def quick_defaults(cls, **overrides: Any) -> DemoOptions:
        # 2,000 requests paced at 3/s: a training cycle takes 1-1.5 minutes on a 2-core machine
        # that also runs vLLM and the gateway, and the first cycles (~300, ~650 answers) are
        # rejected by the gate; at 8/s the stream was over before the second one finished.
        quick = {"requests": 2000, "quick": True, "rate_per_s": 3.0, "phase_size": 500, "heldout_limit": 400,
                 "teacher_latency_ms": 150.0}
        return cls(**{**quick, **overrides})
