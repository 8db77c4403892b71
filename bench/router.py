"""The router's benchmark: OOD quality per detector and decision latency/throughput.

On a CLINC150-format file (default data/clinc150/data_full.json): each detector's AUROC,
FPR at 95% TPR and out-of-scope recall at 95% in-scope kept (fit on ``train``, scored on
``test`` vs. ``oos_test``); then, through ``OODRouter.decide`` with the default detector
and the embedding cache off (every prompt is new): latency p50/p99 of one request at a time,
and decisions/s with 64 concurrent requests. Prints JSON.

    python bench/router.py [--data FILE] [--quick] [--concurrency 64] [--requests 2000]
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
from router.decision import RoutePolicy
from router.embeddings import Embedder
from router.eval_ood import _subsample, load_clinc_format, ood_metrics
from router.ood import DEFAULT_DETECTOR, DETECTORS, create_detector
from router.ood_router import OODRouter

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data" / "clinc150" / "data_full.json"


def quality(splits: dict[str, list[tuple[str, str]]], embedder: Embedder, sizes: dict[str, int | None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Embed once, fit every detector; returns (figures per detector, fitted detectors)."""
    train = _subsample(splits["train"], sizes["train"], 0)
    test = _subsample(splits["test"], sizes["eval"], 0)
    oos = _subsample(splits["oos_test"], sizes["eval"], 0)
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
    sizes_used = {"train": len(train), "test": len(test), "oos_test": len(oos),
                  "batch_embed_per_s": round(embed_rate, 1)}
    return {"sizes": sizes_used, "detectors": figures}, fitted


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--quick", action="store_true", help="small subsets: a smoke run")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args(argv)
    splits = load_clinc_format(args.data)
    sizes = {"train": 450, "eval": 100} if args.quick else {"train": None, "eval": None}
    single, total = (10, 128) if args.quick else (200, args.requests)
    embedder = Embedder()
    report, fitted = quality(splits, embedder, sizes)
    # The latency figures must not be flattered by the cache: every prompt is new to the model.
    router = OODRouter(Embedder(cache_size=0), seed=0)
    router.set_detector("bench", "v1", fitted[DEFAULT_DETECTOR])
    texts = [text for text, _ in splits["test"] + splits["oos_test"]]
    np.random.default_rng(1).shuffle(texts)
    report["decide"] = asyncio.run(latency_and_throughput(router, texts, single, total, args.concurrency))
    report.update({"default_detector": DEFAULT_DETECTOR, "data": str(args.data), "quick": args.quick,
                   "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)})
    router.close()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
