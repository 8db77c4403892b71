"""Prompts the teacher answered out of scope: in the detector's score, or masked (vote only).

A label route's teacher answers ``oos`` to what is out of scope, and the demo's stream (like an
app's traffic) repeats such prompts. With ``cascade.mask_escalated_prompts`` the trainer keeps them
in the kNN bank for the cascade's neighbour vote but out of the score (``KNNDetector.fit(...,
scored=)``). This
measures what the mask does to the OOD detector on CLINC150: each detector is fitted on
``--sizes`` training prompts plus the 200 ``oos_train`` + ``oos_val`` prompts labelled ``oos``
(as the stream brings them), once with those in the score and once masked, then scored on
``test`` vs ``oos_test``: AUROC, and at each threshold the in-scope prompts kept and the
out-of-scope prompts sent to the teacher. Masked, it also reads a drift window as the stream
brings it (450 ``val`` prompts and 50 of the 200 out-of-scope ones): the share above the
detector's training percentile on the OOD score and on the novelty drift reads. Prints JSON.

    python bench/detector_mask.py [--sizes 1000 2000 3500 5000] [--detectors knn knn_tuned]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import track

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from router.artifacts import create_embedder
from router.eval_ood import load_clinc_format, ood_metrics, subsample
from router.ood import create_detector
from router.tuned import detector_embeddings

THRESHOLDS = {"knn": [0.5], "knn_lda": [0.43, 0.45], "knn_tuned": [0.39, 0.40, 0.41, 0.42]}


def measure(splits: dict[str, list[tuple[str, str]]], embedder: Any, size: int, kind: str, masked: bool,
            thresholds: list[float], seed: int = 0) -> dict[str, Any]:
    """One detector fitted on ``size`` training prompts and the labelled out-of-scope ones."""
    out_of_scope = [(text, "oos") for text, _ in splits["oos_train"] + splits["oos_val"]]
    rows = subsample(splits["train"], size, seed) + out_of_scope
    texts, labels = [text for text, _ in rows], [label for _, label in rows]
    scored = [label != "oos" for label in labels] if masked else None
    detector = create_detector(kind)
    if getattr(detector, "fits_texts", False):
        detector.fit_texts(texts, labels, embedder, scored=scored)
    else:
        detector.fit(embedder.encode(texts), labels, scored=scored)
    in_scope = detector.score(detector_embeddings(detector, embedder, [text for text, _ in splits["test"]]))
    far = detector.score(detector_embeddings(detector, embedder, [text for text, _ in splits["oos_test"]]))
    result = {"training_prompts": size, "detector": kind, "out_of_scope_prompts": "masked" if masked else "in the score",
              "auroc": round(ood_metrics(in_scope, far)["auroc"], 4),
              "at_threshold": {str(threshold): {"in_scope_kept": round(float((in_scope <= threshold).mean()), 4),
                                                "oos_sent": round(float((far > threshold).mean()), 4)}
                               for threshold in thresholds}}
    if masked:
        result["drift_window"] = drift_window(splits, embedder, detector, seed)
    return result


def drift_window(splits: dict[str, list[tuple[str, str]]], embedder: Any, detector: Any, seed: int) -> dict[str, float]:
    """Novel share (above the training percentile) of a window of 500 with 10 % repeated out-of-scope prompts."""
    rng = np.random.default_rng(seed)
    in_scope = [text for text, _ in splits["val"]]
    out_of_scope = [text for text, _ in splits["oos_train"] + splits["oos_val"]]
    window = ([in_scope[i] for i in rng.choice(len(in_scope), 450, replace=False)]
              + [out_of_scope[i] for i in rng.choice(len(out_of_scope), 50)])
    scores, novelty, _ = detector.assess(detector_embeddings(detector, embedder, window))
    line = detector.meta["threshold_keep_95"]
    return {"novel_share_on_score": round(float((scores > line).mean()), 4),
            "novel_share_on_novelty": round(float((novelty > line).mean()), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/clinc150/data_full.json"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 3500, 5000])
    parser.add_argument("--detectors", nargs="+", default=["knn", "knn_tuned"], choices=sorted(THRESHOLDS))
    parser.add_argument("--artifacts-dir", type=Path, default=Path("var/models/router"))
    args = parser.parse_args(argv)
    splits = load_clinc_format(args.data)
    config = argparse.Namespace(embedder="static", artifacts_dir=args.artifacts_dir, cache_mb=0.0)
    embedder = create_embedder(config, build=True, cache_bytes=0)
    cases = [(size, kind, masked) for size in args.sizes for kind in args.detectors for masked in (False, True)]
    results = [measure(splits, embedder, size, kind, masked, THRESHOLDS[kind])
               for size, kind, masked in track(cases, description="fitting", transient=True)]
    print(json.dumps({"embedder": embedder.id, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
