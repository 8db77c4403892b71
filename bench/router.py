"""The router's benchmark: OOD quality and decision cost per embedder, side by side.

On a CLINC150-format file (default data/clinc150/data_full.json), for each embedder
(``static``, ``onnx``, ``minilm``; built from the packaged MiniLM on first use):
- far-OOD figures per detector (fit on ``train``, ``test`` vs ``oos_test``);
- near-OOD figures of the default detector (whole intents held out, 3 seeds; eval_ood);
- through ``OODRouter.decide`` with the default detector and the cache off (every prompt is
  new): p50/p99 of one request at a time, and decisions/s with 64 concurrent requests;
then each figure against the goals of issue 12. Prints JSON.

    python bench/router.py [--embedders static onnx minilm] [--quick] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from core.modes import Mode
from router.artifacts import create_embedder
from router.decision import RoutePolicy
from router.embeddings import Embedder
from router.eval_ood import load_clinc_format, near_ood, ood_metrics, subsample
from router.ood import ALL_DETECTORS, DEFAULT_DETECTOR, DETECTORS, create_detector
from router.ood_router import OODRouter

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data" / "clinc150" / "data_full.json"


GOALS = {"decision_p50_ms": 1.0, "decisions_per_s": 3000.0, "far_auroc": 0.97, "near_auroc": 0.93}


def quality(splits: dict[str, list[tuple[str, str]]], embedder: Embedder, sizes: dict[str, int | None],
            chosen: str = DEFAULT_DETECTOR) -> tuple[dict[str, Any], dict[str, Any]]:
    """Embed once, fit every detector (far) and the chosen one (near); returns (figures, fitted)."""
    train = subsample(splits["train"], sizes["train"], 0)
    test = subsample(splits["test"], sizes["eval"], 0)
    oos = subsample(splits["oos_test"], sizes["eval"], 0)
    started = time.perf_counter()
    train_x = embedder.encode([text for text, _ in train])
    test_x = embedder.encode([text for text, _ in test])
    oos_x = embedder.encode([text for text, _ in oos])
    embed_rate = (len(train) + len(test) + len(oos)) / (time.perf_counter() - started)
    figures, fitted = {}, {}
    for kind in DETECTORS:
        started = time.perf_counter()
        detector = create_detector(kind).fit(train_x, [intent for _, intent in train])
        fit_s = time.perf_counter() - started
        figures[kind] = {**ood_metrics(detector.score(test_x), detector.score(oos_x)), "fit_s": round(fit_s, 2)}
        fitted[kind] = detector
    if chosen not in DETECTORS:  # fitted from texts (knn_tuned): it tunes on the train prompts itself
        started = time.perf_counter()
        detector = create_detector(chosen).fit_texts([t for t, _ in train], [i for _, i in train], embedder)
        fit_s = time.perf_counter() - started
        in_x, oos_tuned = (detector.embed_texts([t for t, _ in rows]) for rows in (test, oos))
        figures[chosen] = {**ood_metrics(detector.score(in_x), detector.score(oos_tuned)), "fit_s": round(fit_s, 2)}
        fitted[chosen] = detector
    near = near_ood(train, train_x, test, test_x, chosen, [0, 1, 2], 0.2, embedder)
    sizes_used = {"train": len(train), "test": len(test), "oos_test": len(oos),
                  "batch_embed_per_s": round(embed_rate, 1)}
    return {"sizes": sizes_used, "detectors": figures, "near_default": near["mean"],
            "near_seeds": [{k: row[k] for k in ("seed", "auroc", "fpr_at_95_tpr")} for row in near["seeds"]]}, fitted


async def latency_and_throughput(router: OODRouter, texts: list[str], single: int, total: int,
                                 concurrency: int) -> dict[str, Any]:
    policy = RoutePolicy("bench", Mode.auto, 0.5, None, 0.0, "v1")
    await router.warmup()
    samples = []
    for text in texts[:single]:
        started = time.perf_counter()
        await router.decide(policy, [{"role": "user", "content": text}])
        samples.append((time.perf_counter() - started) * 1000)
    queue = [texts[(single + i) % len(texts)] for i in range(total)]
    latencies: list[float] = []

    async def client() -> None:
        while queue:
            text = queue.pop()
            started = time.perf_counter()
            await router.decide(policy, [{"role": "user", "content": text}])
            latencies.append((time.perf_counter() - started) * 1000)

    batches_before = router._batcher.batches
    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    batches = router._batcher.batches - batches_before
    return {
        "single": {"n": len(samples), "p50_ms": round(float(np.percentile(samples, 50)), 2),
                   "p99_ms": round(float(np.percentile(samples, 99)), 2)},
        "concurrent": {"concurrency": concurrency, "requests": total,
                       "decisions_per_s": round(total / elapsed, 1),
                       "p50_ms": round(float(np.percentile(latencies, 50)), 2),
                       "p99_ms": round(float(np.percentile(latencies, 99)), 2),
                       "mean_batch": round(total / max(batches, 1), 1)},
    }


def bench_embedder(kind: str, splits: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    config = argparse.Namespace(embedder=kind, artifacts_dir=args.artifacts_dir, cache_mb=64.0)
    sizes = {"train": 450, "eval": 100} if args.quick else {"train": args.max_train, "eval": args.max_eval}
    single, total = (10, 128) if args.quick else (200, args.requests)
    report, fitted = quality(splits, create_embedder(config, build=True), sizes, args.detector)
    # The latency figures must not be flattered by the cache: every prompt is new to the model.
    router = OODRouter(create_embedder(config, cache_bytes=0), seed=0)
    router.set_detector("bench", "v1", fitted[args.detector])
    texts = [text for text, _ in splits["test"] + splits["oos_test"]]
    np.random.default_rng(1).shuffle(texts)
    report["decide"] = asyncio.run(latency_and_throughput(router, texts, single, total, args.concurrency))
    report["embedder_id"], report["dim"] = router.embedder.id, router.embedder.dim
    router.close()
    return report


def against_goals(report: dict[str, Any], detector: str = DEFAULT_DETECTOR) -> dict[str, Any]:
    measured = {"decision_p50_ms": report["decide"]["single"]["p50_ms"],
                "decisions_per_s": report["decide"]["concurrent"]["decisions_per_s"],
                "far_auroc": report["detectors"][detector]["auroc"],
                "near_auroc": report["near_default"]["auroc"]}
    lower_is_better = {"decision_p50_ms"}
    return {name: {"measured": round(value, 4), "goal": GOALS[name],
                   "met": value <= GOALS[name] if name in lower_is_better else value >= GOALS[name]}
            for name, value in measured.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--embedders", nargs="+", default=["static", "onnx"], choices=["static", "onnx", "minilm"])
    parser.add_argument("--artifacts-dir", type=Path, default=Path("var/models/router"))
    parser.add_argument("--quick", action="store_true", help="small subsets: a smoke run")
    parser.add_argument("--max-train", type=int, default=None, help="subsample train (the transformers are slow)")
    parser.add_argument("--max-eval", type=int, default=None, help="subsample test and oos_test")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--detector", default=DEFAULT_DETECTOR, choices=sorted(ALL_DETECTORS),
                        help="the detector timed, judged on near-OOD and against the goals")
    args = parser.parse_args(argv)
    splits = load_clinc_format(args.data)
    report: dict[str, Any] = {"default_detector": DEFAULT_DETECTOR, "detector": args.detector, "data": str(args.data), "quick": args.quick,
                              "embedders": {}}
    for kind in args.embedders:
        measured = bench_embedder(kind, splits, args)
        measured["goals"] = against_goals(measured, args.detector)
        report["embedders"][kind] = measured
    report.update({"cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)})
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
