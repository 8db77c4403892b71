"""The routing seam: what a decision is, what a route's live policy is, and ``Router``.

The gateway builds a :class:`RoutePolicy` from the route's config plus its live overrides
and asks a :class:`Router` for a :class:`Decision`. Nothing here knows about HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from core.modes import Mode

Target = Literal["student", "teacher"]


@dataclass(frozen=True)
class RoutePolicy:
    """A route's routing settings as they are right now (config + live overrides)."""

    route: str
    mode: Mode
    ood_threshold: float
    confidence_threshold: float | None
    shadow_rate: float
    student_version: str | None  # None: no student yet (cold start)
    # The learned router's veto (router/learned.py): under this predicted agreement the
    # teacher answers. None: off for the route, or the serving version has no learned router.
    learned_min_agree: float | None = None


@dataclass
class Decision:
    target: Target
    score: float | None = None  # OOD score; higher = further from the student's training data
    reasons: list[str] = field(default_factory=list)
    cascade: bool = False  # the student answers first; low confidence sends it to the teacher
    shadow: bool = False  # also send to the teacher off the hot path to measure agreement
    # The teacher's answers (``core.answers.answer_hash``) to the nearest training prompts,
    # when the detector keeps them: the cascade weighs the student's answer against them.
    neighbour_answers: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


class Router(Protocol):
    async def decide(self, policy: RoutePolicy, messages: list[dict[str, Any]]) -> Decision: ...


class PolicyRouter:
    """Mode and cold-start rules only; no learned signal. The router of last resort."""

    async def decide(self, policy: RoutePolicy, messages: list[dict[str, Any]]) -> Decision:
        return decide_without_score(policy)


def decide_without_score(policy: RoutePolicy) -> Decision:
    if policy.mode is Mode.teacher_only:
        return Decision("teacher", reasons=["mode=teacher_only"])
    if policy.student_version is None:
        return Decision("teacher", reasons=["cold_start: no live student"])
    if policy.mode is Mode.student_only:
        return Decision("student", reasons=["mode=student_only"])
    if policy.mode is Mode.shadow:
        return Decision("teacher", reasons=["mode=shadow"], shadow=True)
    return Decision("student", reasons=["no OOD detector fitted"])
