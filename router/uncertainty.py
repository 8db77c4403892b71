"""How sure the student was of its answer, from OpenAI-format token logprobs.

Used by the cascade: the student answers with ``logprobs: true``; when its confidence is
under the route's ``confidence_threshold`` the answer is discarded and the teacher serves.
The threshold is a log-probability (<= 0): -0.5 means "tokens averaged ~60% probability".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Aggregate = Literal["mean", "min"]


@dataclass(frozen=True)
class Confidence:
    mean_logprob: float
    min_logprob: float
    tokens: int

    @property
    def mean_prob(self) -> float:
        """Geometric-mean token probability, the operator-friendly view of ``mean_logprob``."""
        return math.exp(self.mean_logprob)


def _field(item: Any, name: str) -> Any:
    return item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)


def token_logprobs(response_or_logprobs: Any) -> list[float]:
    """Token logprobs from a chat completion (dict or SDK object), its ``logprobs``, or a list.

    Accepts ``{"choices": [{"logprobs": {"content": [...]}}]}``, ``{"content": [...]}`` or the
    content list itself; returns [] when the answer carries no logprobs.
    """
    value = response_or_logprobs
    choices = _field(value, "choices") if not isinstance(value, Sequence) else None
    if choices:
        value = _field(choices[0], "logprobs")
    if value is not None and not isinstance(value, Sequence):
        value = _field(value, "content")
    if not value:
        return []
    out = []
    for token in value:
        logprob = _field(token, "logprob")
        if logprob is not None and math.isfinite(float(logprob)):
            out.append(float(logprob))
        elif logprob is not None:  # -inf: the sampler took a token it gave no mass
            out.append(-1e9)
    return out


def confidence(response_or_logprobs: Any) -> Confidence | None:
    """Mean and min token logprob of the answer; None when there are no logprobs."""
    values = token_logprobs(response_or_logprobs)
    if not values:
        return None
    return Confidence(mean_logprob=sum(values) / len(values), min_logprob=min(values), tokens=len(values))


def confident(logprobs: Any, threshold: float, aggregate: Aggregate = "mean") -> bool:
    """True when the answer's ``aggregate`` token logprob is at least ``threshold``.

    No logprobs at all counts as not confident: the cascade cannot vouch for the answer.
    """
    measured = confidence(logprobs)
    if measured is None:
        return False
    value = measured.mean_logprob if aggregate == "mean" else measured.min_logprob
    return value >= threshold
