"""The canary's sequential test: is a candidate's online agreement with the teacher worse
than the live version's? And which requests the canary serves.

Evidence per arm (canary, live) is the shadow comparisons of its served answers with the
teacher's (``agreed`` of ``compared``) and the negative feedback on them. The canary is
judged at *looks*: once both arms hold ``min_evidence`` comparisons, then each time the
canary's comparisons double (look ``k`` at ``min_evidence * 2**(k-1)``). At look ``k`` the
canary's agreement gets one-sided Clopper-Pearson bounds at confidence ``1 - alpha_k``,
``alpha_k = alpha / (k (k + 1))``: the alphas sum to ``alpha = 1 - confidence`` over all
looks, so however long the canary runs and whenever the test stops, the chance of a wrong
promotion (or of a wrong rollback) is at most ``alpha`` (a union bound over the looks).
Against live's agreement ``a`` (its point estimate: live usually holds as much evidence as
the canary or more) and the tolerance ``t``:

- **rollback** when the upper bound is below ``a - t``: the canary is worse;
- **promote** when the lower bound is at least ``a - t``: it is not worse beyond ``t``;
- otherwise **wait** for the next look.

Negative feedback rolls the canary back whatever the agreement says, once it has at least
``min_negative_feedback`` negative rows and their share of its served answers is above
live's share plus ``negative_feedback_margin``. At ``max_duration`` without a decision the
point estimates decide: promote when the canary has ``min_evidence`` comparisons and its
agreement is at least ``a - t``, else roll back (a candidate that could not show it is not
worse does not take all the traffic).

Pure functions and dataclasses: no FastAPI, no I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Literal

from core.route_config import RolloutConfig
from router.calibration import clopper_pearson_upper

Action = Literal["wait", "promote", "rollback"]


@dataclass
class ArmEvidence:
    """One arm's evidence: answers it served, their shadow comparisons, feedback on them."""

    served: int = 0
    compared: int = 0
    agreed: int = 0
    feedback: int = 0
    negative_feedback: int = 0

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    @property
    def negative_share(self) -> float:
        return self.negative_feedback / self.served if self.served else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "agreement": self.agreement, "negative_share": self.negative_share}


@dataclass(frozen=True)
class Verdict:
    """A look's outcome and the evidence it rests on (what the audit log keeps)."""

    action: Action
    reason: str
    look: int
    confidence: float | None  # of this look's interval (None: no interval computed)
    canary_lower: float | None
    canary_upper: float | None
    live_agreement: float | None
    tolerance: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def agreement_bounds(agreed: int, compared: int, confidence: float) -> tuple[float, float]:
    """One-sided Clopper-Pearson lower and upper bounds on an agreement rate, each holding
    with probability ``confidence``."""
    if compared == 0:
        return 0.0, 1.0
    # An upper bound on the agreements' rate; the lower one is 1 - the disagreements' upper.
    upper = clopper_pearson_upper(agreed, compared, confidence)
    lower = 1.0 - clopper_pearson_upper(compared - agreed, compared, confidence)
    return max(0.0, lower), min(1.0, upper)


def look_confidence(look: int, confidence: float) -> float:
    """The confidence of look ``look`` (1, 2, ...): alpha / (k (k + 1)) sums to alpha."""
    return 1.0 - (1.0 - confidence) / (look * (look + 1))


def looks_due(canary: ArmEvidence, live: ArmEvidence, config: RolloutConfig) -> int:
    """The last look the evidence has reached (0: not enough evidence for one yet)."""
    if canary.compared < config.min_evidence or live.compared < config.min_evidence:
        return 0
    return (canary.compared // config.min_evidence).bit_length()  # 1, 2-3, 4-7, ... x min_evidence


def feedback_blocks(canary: ArmEvidence, live: ArmEvidence, config: RolloutConfig) -> bool:
    return (canary.negative_feedback >= config.min_negative_feedback
            and canary.negative_share > live.negative_share + config.negative_feedback_margin)


def decide(canary: ArmEvidence, live: ArmEvidence, config: RolloutConfig, look: int, *,
           timed_out: bool = False) -> Verdict:
    """The verdict at look ``look`` (0: no look is due; only feedback or the time-out decide)."""
    baseline = live.agreement
    tolerance = config.tolerance

    def verdict(action: Action, reason: str, confidence: float | None = None,
                bounds: tuple[float | None, float | None] = (None, None)) -> Verdict:
        return Verdict(action, reason, look, confidence, bounds[0], bounds[1], baseline, tolerance)

    if feedback_blocks(canary, live, config):
        return verdict("rollback", f"negative feedback on {canary.negative_feedback} canary answers "
                                   f"({canary.negative_share:.3f} of served vs live {live.negative_share:.3f})")
    if look > 0 and baseline is not None:
        confidence = look_confidence(look, config.confidence)
        lower, upper = agreement_bounds(canary.agreed, canary.compared, confidence)
        if upper < baseline - tolerance:
            return verdict("rollback", f"worse: upper bound {upper:.3f} < live {baseline:.3f} - {tolerance}",
                           confidence, (lower, upper))
        if lower >= baseline - tolerance:
            return verdict("promote", f"not worse: lower bound {lower:.3f} >= live {baseline:.3f} - {tolerance}",
                           confidence, (lower, upper))
        if not timed_out:
            return verdict("wait", "undecided: the bounds straddle live's agreement less the tolerance",
                           confidence, (lower, upper))
    if timed_out:
        return _on_timeout(canary, live, config, verdict)
    return verdict("wait", f"too little evidence: {canary.compared} canary and {live.compared} live comparisons "
                           f"(a look needs {config.min_evidence} each)")


def _on_timeout(canary: ArmEvidence, live: ArmEvidence, config: RolloutConfig, verdict: Any) -> Verdict:
    """Time-out: the point estimates decide, and too little evidence is a rollback."""
    if canary.compared < config.min_evidence or live.agreement is None or canary.agreement is None:
        return verdict("rollback", f"timed out with too little evidence ({canary.compared} canary, "
                                   f"{live.compared} live comparisons)")
    if canary.agreement >= live.agreement - config.tolerance:
        return verdict("promote", f"timed out; point estimate {canary.agreement:.3f} >= live "
                                  f"{live.agreement:.3f} - {config.tolerance}")
    return verdict("rollback", f"timed out; point estimate {canary.agreement:.3f} < live "
                               f"{live.agreement:.3f} - {config.tolerance}")


def in_canary(request_id: str, share: float, seed: int = 0) -> bool:
    """Whether the canary serves this request: a seeded hash of its id below ``share``, so the
    split is reproducible and independent of arrival order."""
    digest = hashlib.blake2b(f"{seed}:{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


def live_shadow_rate(config: RolloutConfig, route_shadow_rate: float) -> float:
    """The shadow rate for live-served answers while a canary runs (see RolloutConfig)."""
    if config.live_shadow_rate is not None:
        return config.live_shadow_rate
    matched = config.shadow_rate * config.canary_share / (1.0 - config.canary_share)
    return min(1.0, max(route_shadow_rate, matched))
