"""One route's canary rollout in progress: the candidate's pointer, when it started, and the
evidence both arms have gathered. Kept on the route's ``RouteState`` (``state.canary``) so
the chat service reads it without a lookup; gateway/training/canary.py fills it in."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from core.route_config import RolloutConfig
from gateway.route_table import StudentPointer
from router.canary import ArmEvidence, Verdict, live_shadow_rate


@dataclass
class CanaryRun:
    pointer: StudentPointer
    live_version: str
    config: RolloutConfig
    # The rate live-served answers are shadowed at while the canary runs (RolloutConfig).
    live_shadow_rate: float
    started_at: float = field(default_factory=time.time)
    canary: ArmEvidence = field(default_factory=ArmEvidence)
    live: ArmEvidence = field(default_factory=ArmEvidence)
    looks_done: int = 0
    last_verdict: Verdict | None = None

    @classmethod
    def begin(cls, pointer: StudentPointer, live_version: str, config: RolloutConfig,
              route_shadow_rate: float) -> CanaryRun:
        return cls(pointer, live_version, config, live_shadow_rate(config, route_shadow_rate))

    @property
    def version(self) -> str:
        return self.pointer.version

    def arm(self, version: str | None) -> ArmEvidence | None:
        """The evidence of the arm that ``version`` is (None: neither of them)."""
        if version == self.version:
            return self.canary
        return self.live if version == self.live_version else None

    def timed_out(self, now: float) -> bool:
        return now - self.started_at >= self.config.max_duration_minutes * 60

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "live_version": self.live_version,
            "canary_share": self.config.canary_share,
            "started_at": self.started_at,
            "deadline_at": self.started_at + self.config.max_duration_minutes * 60,
            "confidence_threshold": self.pointer.confidence_threshold,
            "shadow_rate": self.config.shadow_rate,
            "live_shadow_rate": self.live_shadow_rate,
            "canary": self.canary.to_dict(),
            "live": self.live.to_dict(),
            "looks": self.looks_done,
            "last_verdict": self.last_verdict.to_dict() if self.last_verdict is not None else None,
        }
