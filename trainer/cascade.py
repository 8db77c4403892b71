"""A student version's own cascade threshold, calibrated on the route's holdout.

The cascade serves a student answer when its score (``router.uncertainty.penalised``: mean
token logprob less the neighbours' dissent) reaches ``confidence_threshold``. Where that
threshold should sit depends on the version: a fully fine-tuned student grows more
confident with every cycle. So each version gets the lowest threshold at which the holdout
answers it would serve agree with the teacher at least ``target_agreement`` of the time.

The gate must not judge a threshold on the answers it was chosen on (that flatters it), so
the figures the gate sees are cross-fitted: the holdout is split in two seeded folds, a
threshold is calibrated on each and applied to the other, and the served answers of both
are pooled. The threshold the version ships with is calibrated on the whole holdout.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Calibration:
    threshold: float | None  # None: no threshold reaches the target; the student serves nothing
    served: list[int]  # holdout indices served out of fold (the gate's served share and agreement)


def calibrate_threshold(scores: Sequence[float], agrees: Sequence[bool], target: float,
                        confidence: float | None = None) -> float | None:
    """The lowest score whose served answers (score >= it) agree at least ``target``; None if none does.
    A score of -inf (an answer the route escalates) is never a cut point: nothing serves it.

    With ``confidence``, "agree at least ``target``" means the one-sided Clopper-Pearson lower
    bound of their agreement does: the lowest of many cut points whose point estimate reaches
    the target is, by that choice, the luckiest one, and small holdouts make it luckier."""
    ranked = sorted(zip(scores, agrees, strict=True), key=lambda pair: pair[0], reverse=True)
    best, agreeing = None, 0
    for served, (score, agrees_here) in enumerate(ranked, start=1):
        agreeing += agrees_here
        # Ties are served together, so only the last of a run of equal scores is a cut point.
        last_of_tie = served == len(ranked) or ranked[served][0] < score
        if last_of_tie and math.isfinite(score) and _reaches(agreeing, served, target, confidence):
            best = score
    return best


def _reaches(agreeing: int, served: int, target: float, confidence: float | None) -> bool:
    if agreeing < target * served:
        return False  # the bound is never above the point estimate
    if confidence is None:
        return True
    from router.calibration import clopper_pearson_upper

    return 1 - clopper_pearson_upper(served - agreeing, served, confidence) >= target


def cross_fitted(scores: Sequence[float], agrees: Sequence[bool], target: float, seed: str,
                 confidence: float | None = None) -> Calibration:
    """The whole holdout's threshold, and the answers served when each half's threshold is
    applied to the other half."""
    indices = list(range(len(scores)))
    random.Random(seed).shuffle(indices)
    folds = [indices[: len(indices) // 2], indices[len(indices) // 2:]]
    served: list[int] = []
    for fitted, applied in ((folds[0], folds[1]), (folds[1], folds[0])):
        threshold = calibrate_threshold([scores[i] for i in fitted], [agrees[i] for i in fitted], target,
                                        confidence)
        if threshold is not None:
            served.extend(i for i in applied if scores[i] >= threshold)
    return Calibration(calibrate_threshold(scores, agrees, target, confidence), sorted(served))
