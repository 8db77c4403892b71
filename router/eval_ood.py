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

Two protocols (``protocol``):
- ``far``: fit on ``train``, score ``test`` (in-scope) vs ``oos_test`` (out-of-scope).
- ``near``: for each seed, hold out a ``holdout_fraction`` of the in-scope intents (drawn by
  that seed), fit on the others' ``train`` rows, and score the kept intents' ``test`` rows
  vs the held-out intents' ``test`` rows: unknown requests that look like known ones.
  The figures are per seed plus their mean; the same seed always holds out the same intents.
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


def subsample(rows: list[tuple[str, str]], limit: int | None, seed: int) -> list[tuple[str, str]]:
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
            embedding = embedder.encode_uncached([text])  # uncached: what a new prompt costs
            # knn_tuned: the gateway embeds twice (the shared embedding, then its own table's)
            detector.score(detector.embed_texts([text]) if getattr(detector, "fits_texts", False) else embedding)
            samples.append((time.perf_counter() - started) * 1000)
    return {"p50": float(np.percentile(samples, 50)), "p99": float(np.percentile(samples, 99)),
            "n": len(samples)}


def held_out_intents(intents: list[str], fraction: float, seed: int) -> list[str]:
    """The intents a seed holds out: ``fraction`` of them (at least one), drawn by ``seed``."""
    ordered = sorted(set(intents))
    count = min(len(ordered) - 1, max(1, round(len(ordered) * fraction)))
    if count < 1:
        raise ValueError("the near-OOD protocol needs at least two in-scope intents")
    picked = np.random.default_rng(seed).choice(len(ordered), size=count, replace=False)
    return sorted(ordered[i] for i in picked)


def _fit(kind: str, train_x: np.ndarray, train_y: list[str], train_texts: list[str], embedder: Any) -> Any:
    """A fitted detector: from the embeddings, or from the texts for those that tune their own (knn_tuned)."""
    from router.ood import create_detector

    detector = create_detector(kind)
    if getattr(detector, "fits_texts", False):
        return detector.fit_texts(train_texts, train_y, embedder)
    return detector.fit(train_x, train_y)


def _scores(detector: Any, queries: np.ndarray, texts: list[str]) -> np.ndarray:
    return detector.score(detector.embed_texts(texts) if getattr(detector, "fits_texts", False) else queries)


def near_ood(train: list[tuple[str, str]], train_x: np.ndarray, test: list[tuple[str, str]],
             test_x: np.ndarray, kind: str, seeds: list[int], fraction: float,
             embedder: Any | None = None) -> dict[str, Any]:
    """The held-out-intents protocol over ``seeds``: figures per seed and their mean.

    ``embedder``: what a detector that fits from texts (knn_tuned) tunes; it sees only the kept intents.
    """
    train_y = np.asarray([intent for _, intent in train])
    test_y = np.asarray([intent for _, intent in test])
    train_texts = np.asarray([text for text, _ in train], dtype=object)
    test_texts = [text for text, _ in test]
    per_seed = []
    for seed in seeds:
        held = held_out_intents(list(train_y), fraction, seed)
        fit_rows, known = ~np.isin(train_y, held), ~np.isin(test_y, held)
        if known.all() or not known.any():
            raise ValueError(f"seed {seed}: the held-out intents leave no known or no unknown test rows")
        detector = _fit(kind, train_x[fit_rows], list(train_y[fit_rows]), list(train_texts[fit_rows]), embedder)
        scores = _scores(detector, test_x, test_texts)
        per_seed.append({"seed": seed, "held_out_intents": held, "known": int(known.sum()),
                         "unknown": int((~known).sum()), **ood_metrics(scores[known], scores[~known])})
    keys = ("auroc", "fpr_at_95_tpr", "oos_recall_at_95_inscope")
    mean = {key: float(np.mean([row[key] for row in per_seed])) for key in keys}
    return {"holdout_fraction": fraction, "seeds": per_seed, "mean": mean}


def evaluate(
    path: str | Path,
    detector_kind: str = "knn",
    *,
    embedder: Any | None = None,
    max_train: int | None = None,
    max_eval: int | None = None,
    latency_samples: int = 50,
    seed: int = 0,
    protocol: str = "far",
    seeds: list[int] | None = None,
    holdout_fraction: float = 0.2,
) -> dict[str, Any]:
    """Fit ``detector_kind`` on ``train``; the far protocol, the near one, or both.

    The far figures stay at the top level (``auroc``...); the near ones are under ``near``.
    """
    from router.embeddings import Embedder

    if protocol not in ("far", "near", "both"):
        raise ValueError(f"unknown protocol {protocol!r}: far, near or both")
    splits = load_clinc_format(path)
    embedder = embedder or Embedder()
    train = subsample(splits["train"], max_train, seed)
    test = subsample(splits["test"], max_eval, seed)
    oos = subsample(splits["oos_test"], max_eval, seed)
    started = time.perf_counter()
    train_x = embedder.encode([text for text, _ in train])
    embed_s = time.perf_counter() - started
    test_x = embedder.encode([text for text, _ in test])
    result: dict[str, Any] = {"detector": detector_kind, "embedder": embedder.id, "dim": embedder.dim,
                              "protocol": protocol, "data": str(path), "train": len(train), "test": len(test),
                              "oos_test": len(oos), "train_embed_s": round(embed_s, 3)}
    if protocol in ("far", "both"):
        started = time.perf_counter()
        detector = _fit(detector_kind, train_x, [intent for _, intent in train], [text for text, _ in train], embedder)
        result["fit_s"] = round(time.perf_counter() - started, 3)
        oos_x = embedder.encode([text for text, _ in oos])
        result.update(ood_metrics(_scores(detector, test_x, [text for text, _ in test]),
                                  _scores(detector, oos_x, [text for text, _ in oos])))
        probe = [text for text, _ in (test + oos)][:latency_samples]
        result["latency_ms"] = _latency(detector, embedder, probe)
    if protocol in ("near", "both"):
        result["near"] = near_ood(train, train_x, test, test_x, detector_kind, seeds or [0, 1, 2], holdout_fraction,
                                  embedder)
    return result
