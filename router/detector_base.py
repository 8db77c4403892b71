"""What every OOD detector shares: the ``OODDetector`` seam, array helpers and the file format.

A detector saves as one ``.npz`` of arrays plus a JSON header (no pickled code); loading is
``router.ood.load_detector``, which knows the registered kinds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

FORMAT_VERSION = 1


@runtime_checkable
class OODDetector(Protocol):
    name: str
    meta: dict[str, Any]

    def fit(self, embeddings: np.ndarray, labels: Sequence[str] | None = None) -> OODDetector: ...

    def score(self, embeddings: np.ndarray) -> np.ndarray: ...

    def save(self, path: str | Path) -> Path: ...


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.maximum(norms, 1e-12)).astype(np.float32)


def as_matrix(embeddings: np.ndarray) -> np.ndarray:
    matrix = np.asarray(embeddings, dtype=np.float32)
    return matrix[None, :] if matrix.ndim == 1 else matrix


def class_means(matrix: np.ndarray, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    classes, index = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    sums = np.zeros((len(classes), matrix.shape[1]), dtype=np.float64)
    np.add.at(sums, index, matrix)
    means = sums / np.bincount(index, minlength=len(classes))[:, None]
    return means.astype(np.float32), index, [str(name) for name in classes]


def npz_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def save_detector(detector: Any, path: str | Path) -> Path:
    """Write ``<path>.npz`` (arrays) with a JSON header inside; returns the file written."""
    target = npz_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT_VERSION, "kind": detector.name, "params": detector.params(),
              "meta": detector.meta}
    arrays = {key: value for key, value in detector.arrays().items() if value is not None}
    tmp = target.with_name(target.name + ".tmp.npz")
    np.savez(tmp, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
    tmp.replace(target)  # atomic: a loader never sees a half-written detector
    return target
