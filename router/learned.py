"""An optional learned router: P(student agrees with teacher | prompt embedding, OOD score).

Trained from shadow results (a student answer and a teacher answer for the same prompt).
A logistic regression on the embedding plus the OOD score: small, fast to fit, and its
coefficients save as plain arrays (``.npz`` + JSON, no pickle). The OOD router consults it
when one is set for a route: the request goes to the teacher when the predicted agreement
is under ``min_agree``.
"""

from __future__ import annotations

import json
import logging
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
            raise ValueError("learned router needs both agreeing and disagreeing shadow results")
        model = LogisticRegression(C=self.c, max_iter=1000, class_weight="balanced")
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
        with np.load(source, allow_pickle=False) as data:
            header = json.loads(bytes(data["header"]).decode())
            coef = data["coef"]
        if header.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported learned-router format in {source}")
        router = cls(min_agree=header["min_agree"], c=header["c"])
        router.coef, router.intercept, router.meta = coef, float(header["intercept"]), header["meta"]
        return router


def train_from_shadow(
    rows: Sequence[dict[str, Any]], embedder: Any, prompts: Sequence[str], min_agree: float = 0.5
) -> LearnedRouter:
    """Fit from shadow results (``router_score``, ``agree``) and their prompts' user text.

    ``prompts[i]`` is the user text of ``rows[i]``'s request (the gateway joins
    ``shadow_results.request_id`` to ``requests.request_json``). Rows without a score are skipped.
    """
    keep = [i for i, row in enumerate(rows) if row.get("router_score") is not None and row.get("agree") is not None]
    embeddings = embedder.encode([prompts[i] for i in keep])
    scores = [float(rows[i]["router_score"]) for i in keep]
    agree = [int(rows[i]["agree"]) for i in keep]
    return LearnedRouter(min_agree=min_agree).fit(embeddings, scores, agree)
