"""The Mahalanobis OOD detector (router/ood.py registers it; kNN is the default)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from router.detector_base import as_matrix, class_means, save_detector


class MahalanobisDetector:
    """Mahalanobis distance with a Ledoit-Wolf shrinkage covariance.

    With labels: class-conditional means and one shared covariance of the residuals (the
    usual recipe for sentence embeddings), scoring the distance to the nearest class mean.
    """

    name = "mahalanobis"

    def __init__(self) -> None:
        self.meta: dict[str, Any] = {}
        self.means: np.ndarray | None = None
        self.precision: np.ndarray | None = None

    def fit(self, embeddings: np.ndarray, labels: Sequence[str] | None = None) -> MahalanobisDetector:
        from sklearn.covariance import LedoitWolf

        matrix = as_matrix(embeddings).astype(np.float64)
        if labels is not None and len(set(labels)) > 1:
            means, index, _ = class_means(matrix, labels)
            residuals = matrix - means[index]
        else:
            means = matrix.mean(axis=0, keepdims=True)
            residuals = matrix - means
        estimator = LedoitWolf().fit(residuals)
        self.means = np.asarray(means, dtype=np.float32)
        self.precision = estimator.precision_.astype(np.float32)
        self.meta = {"train_size": len(matrix), "classes": len(self.means),
                     "shrinkage": float(estimator.shrinkage_)}
        self.meta["threshold_keep_95"] = float(np.quantile(self.score(matrix), 0.95))
        return self

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        assert self.means is not None and self.precision is not None, "detector is not fitted"
        queries = as_matrix(embeddings)
        projected = queries @ self.precision
        # |x - m|^2_P expanded so all classes are scored in one matrix product.
        squared = (
            (projected * queries).sum(axis=1)[:, None]
            - 2.0 * projected @ self.means.T
            + ((self.means @ self.precision) * self.means).sum(axis=1)[None, :]
        )
        return np.sqrt(np.maximum(squared.min(axis=1), 0.0) / queries.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        return {"means": self.means, "precision": self.precision}

    def params(self) -> dict[str, Any]:
        return {}

    def restore(self, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> None:
        self.means, self.precision = arrays["means"], arrays["precision"]

    def save(self, path: str | Path) -> Path:
        return save_detector(self, path)
