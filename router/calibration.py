"""Choose a route's ``ood_threshold`` from (ood_score, agree) pairs, with a guarantee.

The pairs come from shadow results (the student answered, the teacher answered the same
prompt, ``agree`` says whether they matched) and held-out evaluations. For each candidate
threshold ``t`` the student would serve every prompt with score <= t; the question is how
often it would disagree with the teacher on those.

A bare point estimate overfits the sweep, so the threshold is certified instead: for each
candidate, a one-sided Clopper-Pearson upper confidence bound on the disagreement rate among
student-served prompts, tested in fixed sequence from a conservative threshold up (the first
serving ``4 x min_trials`` prompts) and stopping at the first failure (Learn-then-Test, Angelopoulos et al. 2021). Then, with
probability at least ``confidence`` over the calibration data, the recommended threshold's
disagreement rate on student-served traffic (from the same distribution) is at most
``1 - target_agreement``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from core.store import reporting, score_reads, score_rollups
from core.store.score_reads import ScoreHistogram

START_FACTOR = 4
GUARANTEE = "Clopper-Pearson upper bound on disagreement, fixed-sequence testing (Learn-then-Test)"


class CurvePoint(BaseModel):
    threshold: float
    student_share: float
    accepted: int
    disagreements: int
    agreement: float  # point estimate among student-served prompts
    agreement_lcb: float  # lower confidence bound (1 - Clopper-Pearson upper on disagreement)
    overall_agreement: float  # teacher-served prompts count as agreeing
    relative_cost: float  # cost per request relative to sending everything to the teacher
    certified: bool = False


class Calibration(BaseModel):
    target_agreement: float
    confidence: float
    guarantee: str = GUARANTEE
    pairs: int
    base_agreement: float | None
    recommended_threshold: float | None
    recommended: CurvePoint | None
    curve: list[CurvePoint] = Field(default_factory=list)
    note: str = ""


def clopper_pearson_upper(failures: int, trials: int, confidence: float) -> float:
    """One-sided upper confidence bound on a binomial rate (exact, conservative)."""
    if trials == 0:
        return 1.0
    if failures >= trials:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(confidence, failures + 1, trials - failures))


def min_trials(target_agreement: float, confidence: float) -> int:
    """Fewest accepted prompts for which zero disagreements could pass the bound."""
    risk = 1.0 - target_agreement
    return max(1, math.ceil(math.log(1.0 - confidence) / math.log(1.0 - risk))) if risk > 0 else 1


def _candidates(scores: np.ndarray, max_points: int) -> np.ndarray:
    unique = np.unique(scores)
    if len(unique) <= max_points:
        return unique
    return np.unique(np.quantile(scores, np.linspace(0, 1, max_points), method="higher"))


def calibrate(
    pairs: Iterable[tuple[float, int | bool]],
    *,
    target_agreement: float = 0.97,
    confidence: float = 0.95,
    student_cost: float = 0.0,
    teacher_cost: float = 1.0,
    max_points: int = 200,
) -> Calibration:
    """Sweep thresholds over the observed scores and recommend the certified maximum."""
    data = [(float(score), int(bool(agree))) for score, agree in pairs if score is not None]
    if not data:
        return Calibration(target_agreement=target_agreement, confidence=confidence, pairs=0,
                           base_agreement=None, recommended_threshold=None, recommended=None,
                           note="no (score, agree) pairs: run with shadow_rate > 0 first")
    scores = np.array([score for score, _ in data])
    disagree = 1 - np.array([agree for _, agree in data])
    order = np.argsort(scores, kind="stable")
    scores, disagree = scores[order], disagree[order]
    cumulative = np.cumsum(disagree)
    candidates = []
    for threshold in _candidates(scores, max_points):
        accepted = int(np.searchsorted(scores, threshold, side="right"))
        candidates.append((float(threshold), accepted, int(cumulative[accepted - 1]) if accepted else 0))
    return _sweep(candidates, len(scores), int(cumulative[-1]), target_agreement, confidence, student_cost,
                  teacher_cost)


def calibrate_binned(comparisons: Sequence[int], agreements: Sequence[int], edges: Sequence[float], *,
                     target_agreement: float = 0.97, confidence: float = 0.95, student_cost: float = 0.0,
                     teacher_cost: float = 1.0, max_points: int = 200) -> Calibration:
    """``calibrate`` over a score histogram (core/store/score_reads.py): bucket ``i`` holds the
    pairs with ``edges[i-1] < score <= edges[i]``, so the candidates are the edges closing the
    non-empty buckets (thinned to ``max_points`` at quantiles of the pairs, as ``calibrate``
    thins observed scores) and each candidate's accepted and disagreeing counts are exact. The
    grid is fixed before any data is seen, which is what fixed-sequence testing assumes."""
    total, failures_total = sum(comparisons), sum(n - a for n, a in zip(comparisons, agreements, strict=True))
    if not total:
        return calibrate([], target_agreement=target_agreement, confidence=confidence)
    accepted = np.cumsum(comparisons)
    failed = np.cumsum([n - a for n, a in zip(comparisons, agreements, strict=True)])
    filled = [index for index, count in enumerate(comparisons) if count and index < len(edges)]
    if len(filled) > max_points:  # the bucket holding each quantile's pair, as np.quantile(method="higher")
        ranks = np.ceil(np.linspace(0, 1, max_points) * (total - 1)).astype(int)
        filled = sorted({int(np.searchsorted(accepted, rank, side="right")) for rank in ranks} & set(filled))
    candidates = [(float(edges[index]), int(accepted[index]), int(failed[index])) for index in filled]
    return _sweep(candidates, total, failures_total, target_agreement, confidence, student_cost, teacher_cost)


def _sweep(candidates: Sequence[tuple[float, int, int]], total: int, failures_total: int, target_agreement: float,
           confidence: float, student_cost: float, teacher_cost: float) -> Calibration:
    """The certified sweep over (threshold, accepted, disagreements) candidates, lowest first."""
    risk, level = 1.0 - target_agreement, confidence
    n_min = min_trials(target_agreement, confidence)
    # Where the sequence starts: a test at n_min passes only with zero disagreements, so one
    # early unlucky failure would end it. Starting at 4x n_min accepted prompts keeps power;
    # the start depends on the scores alone, never on the agreement labels, so it stays valid.
    n_start = min(START_FACTOR * n_min, total)
    curve, still_passing = [], True
    for threshold, accepted, failures in candidates:
        upper = clopper_pearson_upper(failures, accepted, level)
        share = accepted / total
        point = CurvePoint(
            threshold=threshold, student_share=share, accepted=accepted, disagreements=failures,
            agreement=1.0 - failures / accepted if accepted else 1.0, agreement_lcb=1.0 - upper,
            overall_agreement=1.0 - failures / total,
            relative_cost=((1 - share) * teacher_cost + share * student_cost) / teacher_cost if teacher_cost else 0.0,
        )
        if accepted >= n_start and still_passing:
            # Fixed sequence: the first failure ends the certified run (no multiplicity cost).
            still_passing = upper <= risk
            point.certified = still_passing
        curve.append(point)
    certified = [point for point in curve if point.certified]
    best = certified[-1] if certified else None
    return Calibration(target_agreement=target_agreement, confidence=confidence, pairs=total,
                       base_agreement=1.0 - failures_total / total, recommended_threshold=best.threshold if best else None,
                       recommended=best, curve=curve, note=_note(best, curve, n_min))


def _note(best: CurvePoint | None, curve: Sequence[CurvePoint], n_min: int) -> str:
    if best is None:
        return (f"no threshold certified: needs at least {n_min} student-served pairs with few enough "
                "disagreements; keep the current threshold and collect more shadow data")
    if best is curve[-1]:
        return ("every observed score passes: the threshold is the highest score seen; scores above it "
                "were never observed, so raising it further is not covered by the guarantee")
    return ""


def plot(result: Calibration, path: str | Path, route: str = "") -> Path:
    """Save the trade-off curve (student share, agreement and its bound, cost) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    thresholds = [point.threshold for point in result.curve]
    figure, axis = plt.subplots(figsize=(8, 5))
    axis.plot(thresholds, [p.student_share for p in result.curve], label="student share")
    axis.plot(thresholds, [p.agreement for p in result.curve], label="agreement (student-served)")
    axis.plot(thresholds, [p.agreement_lcb for p in result.curve], "--",
              label=f"agreement lower bound ({result.confidence:.0%})")
    axis.plot(thresholds, [p.relative_cost for p in result.curve], ":", label="cost vs. all-teacher")
    axis.axhline(result.target_agreement, color="grey", linewidth=0.8, label="target agreement")
    if result.recommended_threshold is not None:
        axis.axvline(result.recommended_threshold, color="red", linewidth=0.8, label="recommended")
    axis.set_xlabel("ood_threshold")
    axis.set_ylim(0, 1.02)
    axis.set_title(f"calibration {route}: {result.pairs} pairs")
    axis.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# -- the dashboard's sweep: student share and expected agreement per threshold ------------
@dataclass
class CalibrationPoint:
    threshold: float
    student_share: float  # share of logged requests whose OOD score is at or under the threshold
    expected_agreement: float | None  # shadow agreement among scored comparisons under it
    shadow_samples: int


def calibration_curve(request_scores: list[float], shadow: list[tuple[float, int]],
                      thresholds: list[float]) -> list[CalibrationPoint]:
    """Sweep thresholds: the student serves a request when its OOD score <= threshold, so
    student share is the fraction of scores under it and the expected agreement is the mean
    shadow agreement of the comparisons under it."""
    request_scores = sorted(request_scores)
    shadow = sorted(shadow)
    points = []
    for threshold in thresholds:
        under = sum(1 for score in request_scores if score <= threshold)
        agreed = [agree for score, agree in shadow if score <= threshold]
        points.append(CalibrationPoint(
            threshold=threshold,
            student_share=under / len(request_scores) if request_scores else 0.0,
            expected_agreement=sum(agreed) / len(agreed) if agreed else None,
            shadow_samples=len(agreed),
        ))
    return points


def histogram_curve(histogram: ScoreHistogram, thresholds: list[float]) -> list[CalibrationPoint]:
    """``calibration_curve`` from a score histogram: each threshold is read at the bucket edge
    at or under it (``score_rollups.snap``, at most a factor 2**(1/32) lower), where the
    counts are exact: the raw curve at that edge, not an interpolation."""
    requests = np.cumsum(histogram.requests)
    comparisons, agreements = np.cumsum(histogram.comparisons), np.cumsum(histogram.agreements)
    points = []
    for threshold in thresholds:
        index = score_rollups.snap(threshold)
        under, samples = (int(requests[index]), int(comparisons[index])) if index >= 0 else (0, 0)
        points.append(CalibrationPoint(
            threshold=threshold,
            student_share=under / int(requests[-1]) if requests[-1] else 0.0,
            expected_agreement=int(agreements[index]) / samples if samples else None,
            shadow_samples=samples,
        ))
    return points


def threshold_range(request_scores: list[float], current: float) -> float:
    """The slider's upper end: past every logged score and the current threshold."""
    top = max([*request_scores, current, 0.0])
    return round(max(1.0, top * 1.1), 3)


def _histogram_top(histogram: ScoreHistogram) -> list[float]:
    """The highest scored request's bucket's upper edge (its lower edge for the open last
    bucket): the histogram's stand-in for the highest score, at most 2**(1/32) above it."""
    filled = [index for index, count in enumerate(histogram.requests) if count]
    if not filled:
        return []
    edges = score_rollups.SCORE_EDGES
    return [edges[min(filled[-1], len(edges) - 1)]]


def route_calibration(store: Any, route: str, current: float, since_s: float | None = None,
                      steps: int = 50, target_agreement: float = 0.97, confidence: float = 0.95) -> dict[str, Any]:
    """The calibration curve for the dashboard's threshold control: student share over every
    scored request, expected agreement over the shadow comparisons, and, from
    ``calibrate_binned``, the agreement lower bound and the certified recommended threshold
    (same defaults as ``distillgate calibrate``). Read from the score rollups
    (core/store/score_reads.py): the cost does not grow with the requests in the window."""
    histogram = score_reads.score_histogram(store, route, reporting.window_start(since_s))
    top = threshold_range(_histogram_top(histogram), current)
    thresholds = [round(top * step / steps, 6) for step in range(steps + 1)]
    points = [asdict(point) for point in histogram_curve(histogram, thresholds)]
    shadow_samples = sum(histogram.comparisons)
    result = {"max": top, "step": round(top / steps, 6), "scored_requests": sum(histogram.requests),
              "shadow_samples": shadow_samples, "points": points, "recommended_threshold": None,
              "target_agreement": target_agreement, "confidence": confidence, "note": ""}
    if shadow_samples:
        certified = calibrate_binned(histogram.comparisons, histogram.agreements, score_rollups.SCORE_EDGES,
                                     target_agreement=target_agreement, confidence=confidence)
        result.update(_certified(certified, points))
    return result


def _certified(result: Calibration, points: list[dict[str, Any]]) -> dict[str, Any]:
    """The router's certified calibration (a lower confidence bound on agreement and the
    recommended threshold) laid over the dashboard's sweep."""
    curve = sorted(result.curve, key=lambda point: point.threshold)
    for point in points:
        under = [entry for entry in curve if entry.threshold <= point["threshold"]]
        point["agreement_lcb"] = under[-1].agreement_lcb if under else None
    return {"recommended_threshold": result.recommended_threshold, "note": result.note}
