"""The router's offline benchmark on any CLINC150-format file.

A CLINC150-format file is a JSON object of splits, each a list of ``[utterance, intent]``;
it needs ``train`` (in-scope prompts the student was trained on, with their intents),
``test`` (in-scope) and ``oos_test`` (out-of-scope). Positives are out-of-scope prompts.

- ``auroc``: out-of-scope vs. in-scope, from the OOD score.
- ``fpr_at_95_tpr``: at the threshold that catches 95% of out-of-scope prompts, the share of
  in-scope prompts also sent to the teacher (lost savings).
- ``oos_recall_at_95_inscope``: at the threshold that keeps 95% of in-scope prompts on the
  student, the share of out-of-scope prompts caught.
- ``latency_ms``: one request, embed + score, sequential (p50/p99).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

REQUIRED_SPLITS = ("train", "test", "oos_test")


def load_clinc_format(path: str | Path) -> dict[str, list[tuple[str, str]]]:
    """Read and check a CLINC150-format file; raises ValueError naming what is wrong."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of splits")
    missing = [split for split in REQUIRED_SPLITS if not data.get(split)]
    if missing:
        raise ValueError(f"{path}: missing or empty split(s): {', '.join(missing)}")
    splits: dict[str, list[tuple[str, str]]] = {}
    for split, rows in data.items():
        if not isinstance(rows, list) or not all(isinstance(row, list | tuple) and len(row) == 2 for row in rows):
            raise ValueError(f"{path}: split {split!r} must be a list of [utterance, intent] pairs")
        splits[split] = [(str(text), str(intent)) for text, intent in rows]
    return splits


def _subsample(rows: list[tuple[str, str]], limit: int | None, seed: int) -> list[tuple[str, str]]:
    if limit is None or len(rows) <= limit:
        return rows
    picked = np.random.default_rng(seed).choice(len(rows), size=limit, replace=False)
    return [rows[i] for i in sorted(picked)]


def ood_metrics(in_scores: np.ndarray, oos_scores: np.ndarray) -> dict[str, float]:
    """AUROC, FPR at 95% TPR and out-of-scope recall at 95% in-scope kept."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.zeros(len(in_scores)), np.ones(len(oos_scores))]
    catch_95 = np.quantile(oos_scores, 0.05)  # 95% of OOS have a score >= this
    keep_95 = np.quantile(in_scores, 0.95)  # 95% of in-scope have a score <= this
    return {
        "auroc": float(roc_auc_score(labels, np.r_[in_scores, oos_scores])),
        "fpr_at_95_tpr": float(np.mean(in_scores >= catch_95)),
        "oos_recall_at_95_inscope": float(np.mean(oos_scores > keep_95)),
        "threshold_at_95_inscope": float(keep_95),
    }


def _latency(detector: Any, embedder: Any, texts: list[str]) -> dict[str, float]:
    from threadpoolctl import threadpool_limits

    samples = []
    with threadpool_limits(limits=1, user_api="blas"):
        for text in texts:
            started = time.perf_counter()
            detector.score(embedder._encode_uncached([text]))  # uncached: what a new prompt costs
            samples.append((time.perf_counter() - started) * 1000)
    return {"p50": float(np.percentile(samples, 50)), "p99": float(np.percentile(samples, 99)),
            "n": len(samples)}


def evaluate(
    path: str | Path,
    detector_kind: str = "knn",
    *,
    embedder: Any | None = None,
    max_train: int | None = None,
    max_eval: int | None = None,
    latency_samples: int = 50,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit ``detector_kind`` on ``train`` and score ``test`` vs. ``oos_test``."""
    from router.embeddings import Embedder
    from router.ood import create_detector

    splits = load_clinc_format(path)
    embedder = embedder or Embedder()
    train = _subsample(splits["train"], max_train, seed)
    test = _subsample(splits["test"], max_eval, seed)
    oos = _subsample(splits["oos_test"], max_eval, seed)
    started = time.perf_counter()
    train_embeddings = embedder.encode([text for text, _ in train])
    embed_s = time.perf_counter() - started
    started = time.perf_counter()
    detector = create_detector(detector_kind).fit(train_embeddings, [intent for _, intent in train])
    fit_s = time.perf_counter() - started
    in_scores = detector.score(embedder.encode([text for text, _ in test]))
    oos_scores = detector.score(embedder.encode([text for text, _ in oos]))
    result: dict[str, Any] = {"detector": detector_kind, "data": str(path), "train": len(train),
                              "test": len(test), "oos_test": len(oos)}
    result.update(ood_metrics(in_scores, oos_scores))
    result["fit_s"] = round(fit_s, 3)
    result["train_embed_s"] = round(embed_s, 3)
    probe = [text for text, _ in (test + oos)][:latency_samples]
    result["latency_ms"] = _latency(detector, embedder, probe)
    return result
