"""The learned router: P(this student version agrees with the teacher | prompt embedding, OOD score).

A logistic regression on the embedding plus the version's OOD score, trained in the
version's training cycle on its own holdout answers (trainer/learned_fit.py): small, fast
to fit, and its coefficients save as plain arrays (``.npz`` + JSON, no pickle). Where the
route enables it (``learned_router.enabled``) the OOD router consults the serving version's
one: the request goes to the teacher when the predicted agreement is under ``min_agree``.
Unweighted classes, so that ``min_agree`` reads as a probability (class-balanced weights
vetoed 41-52 % of CLINC150 test prompts at 0.5 for students agreeing 55-66 % of the time).
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


class LearnedRouter:
    """Logistic regression over ``[embedding, ood_score]`` predicting agreement."""

    def __init__(self, min_agree: float = 0.5, c: float = 1.0) -> None:
        self.min_agree = min_agree
        self.c = c
        self.coef: np.ndarray | None = None
        self.intercept = 0.0
        self.meta: dict[str, Any] = {}

    @staticmethod
    def features(embeddings: np.ndarray, ood_scores: Sequence[float] | np.ndarray) -> np.ndarray:
        matrix = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
        scores = np.asarray(ood_scores, dtype=np.float32).reshape(-1, 1)
        return np.hstack([matrix, scores])

    def fit(self, embeddings: np.ndarray, ood_scores: Sequence[float], agree: Sequence[int]) -> LearnedRouter:
        from sklearn.linear_model import LogisticRegression

        labels = np.asarray(agree, dtype=int)
        if len(set(labels.tolist())) < 2:
            raise ValueError("learned router needs both agreeing and disagreeing answers")
        model = LogisticRegression(C=self.c, max_iter=1000, class_weight=None)
        model.fit(self.features(embeddings, ood_scores), labels)
        self.coef = model.coef_[0].astype(np.float32)
        self.intercept = float(model.intercept_[0])
        self.meta = {"examples": len(labels), "agree_rate": float(labels.mean())}
        logger.info("learned router fitted", extra=self.meta)
        return self

    def predict_agree(self, embeddings: np.ndarray, ood_scores: Sequence[float] | np.ndarray) -> np.ndarray:
        """Probability that the student agrees with the teacher, one per row."""
        if self.coef is None:
            raise RuntimeError("learned router is not fitted")
        logits = self.features(embeddings, ood_scores) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-logits))

    def save(self, path: str | Path) -> Path:
        if self.coef is None:
            raise RuntimeError("learned router is not fitted")
        target = Path(path) if str(path).endswith(".npz") else Path(f"{path}.npz")
        target.parent.mkdir(parents=True, exist_ok=True)
        header = {"format": FORMAT_VERSION, "min_agree": self.min_agree, "c": self.c,
                  "intercept": self.intercept, "meta": self.meta}
        np.savez(target, coef=self.coef, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
        return target

    @classmethod
    def load(cls, path: str | Path) -> LearnedRouter:
        source = Path(path) if str(path).endswith(".npz") else Path(f"{path}.npz")
        try:
            with np.load(source, allow_pickle=False) as data:
                header = json.loads(bytes(data["header"]).decode())
                coef = data["coef"]
        except zipfile.BadZipFile as error:  # a truncated copy: the hot swap refuses ValueErrors
            raise ValueError(f"learned router {source} is corrupt ({error})") from None
        if header.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported learned-router format in {source}")
        router = cls(min_agree=header["min_agree"], c=header["c"])
        router.coef, router.intercept, router.meta = coef, float(header["intercept"]), header["meta"]
        return router


def cross_validated_auroc(features: np.ndarray, labels: np.ndarray, c: float, folds: int = 5,
                          seed: int = 0) -> float | None:
    """AUROC of out-of-fold predictions (stratified folds); None with under two of either class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    folds = min(folds, int(labels.sum()), int(len(labels) - labels.sum()))
    if folds < 2:
        return None
    predicted = np.empty(len(labels), dtype=np.float64)
    for fit, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, labels):
        model = LogisticRegression(C=c, max_iter=1000, class_weight=None).fit(features[fit], labels[fit])
        predicted[held] = model.predict_proba(features[held])[:, 1]
    return float(roc_auc_score(labels, predicted))


def fit_for_version(embeddings: np.ndarray, ood_scores: Sequence[float], agree: Sequence[bool], *,
                    min_pairs: int, min_agree: float = 0.5) -> tuple[LearnedRouter | None, dict[str, Any]]:
    """A version's learned router from its own answers: (router, summary), or (None, summary
    with ``skipped`` saying why) when there are fewer than ``min_pairs`` or one class only.

    ``ood_scores`` are the version's own detector's (what the router sees when serving);
    the summary's ``cv_auroc`` is out of fold, so it is not flattered by the fit.
    """
    labels = np.asarray(agree, dtype=int)
    summary: dict[str, Any] = {"pairs": len(labels), "agree_rate": round(float(labels.mean()), 4) if len(labels) else None}
    if len(labels) < min_pairs:
        return None, {**summary, "skipped": f"{len(labels)} pairs < min_pairs {min_pairs}"}
    if len(set(labels.tolist())) < 2:
        which = "agree" if labels.all() else "disagree"
        return None, {**summary, "skipped": f"all {len(labels)} answers {which} with the teacher: one class"}
    router = LearnedRouter(min_agree=min_agree)
    auroc = cross_validated_auroc(router.features(embeddings, ood_scores), labels, router.c)
    router.fit(embeddings, ood_scores, labels)
    summary["cv_auroc"] = round(auroc, 4) if auroc is not None else None
    router.meta.update(summary)
    return router, summary
