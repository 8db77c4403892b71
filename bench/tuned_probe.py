"""Probe scores on ``knn_tuned``'s tuned embedding (issue 12): fusion with the tuning's head, class scores.

For each protocol case (far; near with 10 / 20 / 30 % of the intents held out, seeds 0-2) the
token table is tuned once, as ``knn_tuned`` tunes it (the kept intents only, a seeded tenth kept
out), and the tuned embeddings plus the classifier head are cached under ``var/probe``; then
every scoring variant is read from the cache (numpy), so variants cost no retuning.

    PYTHONPATH=$PWD nice -n 19 .venv/bin/python bench/tuned_probe.py [--variants a b ...]

Prints one row per variant: far AUROC and the mean near AUROC at each fraction.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from router.eval_ood import held_out_intents, load_clinc_format  # noqa: E402
from router.ood import KNNDetector  # noqa: E402
from router.tuned import CALIBRATION_SHARE, TUNE_SCALE, static_encoder, tune_token_table  # noqa: E402

CACHE = ROOT / "var" / "probe"
FRACTIONS = (0.1, 0.2, 0.3)
SEEDS = (0, 1, 2)
TUNINGS: dict[str, dict[str, Any]] = {}  # --tunings tag=key:value,...: other tuning objectives
EXTRA_SEEDS = (1, 2)
# The unprefixed space and the seed ensembles: knn_tuned's tuning before the contrastive term.
# Today's default is --tunings c1b512=contrast:1,batch_size:512.
CROSS_ENTROPY: dict[str, Any] = {"contrast": 0.0, "batch_size": 128}  # tuning seeds of the ensemble variants (the held tenth stays seed 0's)


def _cached(path: Path, make: Callable[[], dict]) -> dict:
    if path.exists():
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    arrays = make()
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def _tuned(encoder: Any, texts: list[str], labels: list[str], held: np.ndarray, known: list[str],
           unknown: list[str], seed: int, **tuning: Any) -> dict:
    tuned = np.setdiff1d(np.arange(len(texts)), held)
    ids, rows, head = tune_token_table(encoder, [texts[i] for i in tuned], [labels[i] for i in tuned], seed=seed,
                                       **tuning)
    view = copy.copy(encoder)  # as TunedKNNDetector.bind: shares the tokenizer
    view.vectors = encoder.vectors.copy()
    view.vectors[ids] = rows
    return {"fit": view.encode(texts), "head": head, "known": view.encode(known), "unknown": view.encode(unknown)}


def _case(name: str, fit: list[tuple[str, str]], known: list[str], unknown: list[str], embedder: Any) -> dict:
    encoder = static_encoder(embedder)
    texts, labels = [t for t, _ in fit], [y for _, y in fit]
    order = np.random.default_rng(0).permutation(len(texts))
    held = np.sort(order[:round(len(texts) * CALIBRATION_SHARE)])
    arrays = _cached(CACHE / f"{name}.npz", lambda: {
        **_tuned(encoder, texts, labels, held, known, unknown, 0, **CROSS_ENTROPY), "labels": np.asarray(labels), "held": held,
        "classes": np.unique(np.asarray(labels))})
    base = _cached(CACHE / f"{name}.base.npz", lambda: {
        "fit": encoder.encode(texts), "known": encoder.encode(known), "unknown": encoder.encode(unknown)})
    arrays.update({f"base_{key}": value for key, value in base.items()})
    for tag, tuning in TUNINGS.items():
        extra = _cached(CACHE / f"{name}.{tag}.npz",
                        lambda tuning=tuning: _tuned(encoder, texts, labels, held, known, unknown, 0, **tuning))
        arrays.update({f"{tag}_{key}": value for key, value in extra.items()})
    for seed in EXTRA_SEEDS:
        extra = _cached(CACHE / f"{name}.seed{seed}.npz",
                        lambda seed=seed: _tuned(encoder, texts, labels, held, known, unknown, seed, **CROSS_ENTROPY))
        arrays.update({f"s{seed}_{key}": value for key, value in extra.items()})
    return arrays


def cases(embedder: Any) -> dict[str, dict]:
    splits = load_clinc_format(ROOT / "data" / "clinc150" / "data_full.json")
    train, test = splits["train"], splits["test"]
    out = {"far": _case("far", train, [t for t, _ in test], [t for t, _ in splits["oos_test"]], embedder)}
    train_y = [y for _, y in train]
    for fraction in FRACTIONS:
        for seed in SEEDS:
            held = set(held_out_intents(train_y, fraction, seed))
            out[f"near{int(fraction * 100)}_s{seed}"] = _case(
                f"near{int(fraction * 100)}_s{seed}", [r for r in train if r[1] not in held],
                [t for t, y in test if y not in held], [t for t, y in test if y in held], embedder)
            print(f"cached near {fraction} seed {seed}", file=sys.stderr, flush=True)
    return out


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(known)), np.ones(len(unknown))], np.r_[known, unknown]))


# A variant: (case arrays) -> (scores of the calibration tenth, of known, of unknown); higher = further out.
Scores = tuple[np.ndarray, np.ndarray, np.ndarray]


def _knn(c: dict, **kwargs: Any) -> Scores:
    det = KNNDetector(**kwargs).fit(c["fit"], list(c["labels"]))
    held = c["fit"][c["held"]]
    centred = det._centre(held)
    projected = det._project(centred)
    cal = det._knn(projected, exclude_self=True)
    if det.centroids is not None:
        cal = det._combine(cal, det._centroid(det._centroid_space(centred, projected)))
    return cal, det.score(c["known"]), det.score(c["unknown"])


def _head(c: dict, kind: str) -> Scores:
    def one(x: np.ndarray) -> np.ndarray:
        cos = x @ c["head"].T
        if kind == "maxcos":
            return -cos.max(axis=1)
        logits = TUNE_SCALE * cos
        top = logits.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        if kind == "energy":
            return -lse
        return -np.exp(top[:, 0] - lse)  # msp

    return one(c["fit"][c["held"]]), one(c["known"]), one(c["unknown"])


def _maha(c: dict, dims: int = 0, shrink: float = 0.1) -> Scores:
    x = c["fit"].astype(np.float64)
    mean = x.mean(axis=0)
    x = x - mean
    basis = None
    if dims:
        _, vec = np.linalg.eigh(np.cov(x.T))
        basis = vec[:, ::-1][:, :dims]
        x = x @ basis
    classes, index = np.unique(c["labels"], return_inverse=True)
    means = np.zeros((len(classes), x.shape[1]))
    np.add.at(means, index, x)
    means /= np.bincount(index)[:, None]
    resid = x - means[index]
    cov = resid.T @ resid / len(x)
    cov = (1 - shrink) * cov + shrink * np.trace(cov) / len(cov) * np.eye(len(cov))
    prec = np.linalg.inv(cov)

    def one(q: np.ndarray) -> np.ndarray:
        q = q.astype(np.float64) - mean
        q = q @ basis if basis is not None else q
        p = q @ prec
        d = (p * q).sum(1)[:, None] - 2 * p @ means.T + ((means @ prec) * means).sum(1)[None, :]
        return d.min(axis=1)

    return one(c["fit"][c["held"]]), one(c["known"]), one(c["unknown"])


def _z(parts: Scores) -> Scores:
    mu, sd = parts[0].mean(), max(parts[0].std(), 1e-9)
    return tuple((p - mu) / sd for p in parts)  # type: ignore[return-value]


def fuse(a: Scores, b: Scores, weight: float) -> Scores:
    za, zb = _z(a), _z(b)
    return tuple(x + weight * y for x, y in zip(za, zb, strict=True))  # type: ignore[return-value]


def sub(c: dict, prefix: str) -> dict:
    """The case with another embedding space (``base_``: untuned static; ``s1_``: tuning seed 1)."""
    return {**c, **{key: c[prefix + key] for key in ("fit", "known", "unknown")}}


def _norm(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def soup(c: dict, prefixes: tuple[str, ...]) -> dict:
    """Mean of several tuned spaces' embeddings (close to one table averaged over the tunings)."""
    return {**c, **{key: _norm(sum(c[p + key] for p in prefixes)) for key in ("fit", "known", "unknown")}}


def concat(c: dict, prefixes: tuple[str, ...]) -> dict:
    return {**c, **{key: _norm(np.hstack([c[p + key] for p in prefixes])) for key in ("fit", "known", "unknown")}}


def mean_of(parts: list[Scores]) -> Scores:
    return tuple(np.mean([p[i] for p in parts], axis=0) for i in range(3))  # type: ignore[return-value]


def _in(tag: str, fn: Callable[..., Scores], *args: Any, **kwargs: Any) -> Callable[[dict], Scores]:
    """``fn`` read in the space ``tag`` (a tuning's or ``base``; "" is the cross-entropy tuning)."""
    return lambda c: fn(sub(c, f"{tag}_") if tag else c, *args, **kwargs)


def _fused(tag: str, other: Callable[..., Scores], weight: float, *args: Any) -> Callable[[dict], Scores]:
    return lambda c: fuse(_in(tag, _knn)(c), _in(tag, other, *args)(c), weight)


def variants() -> dict[str, Callable[[dict], Scores]]:
    v: dict[str, Callable[[dict], Scores]] = {
        "knn_tuned": _in("", _knn), "knn_base": _in("base", _knn), "knn_s1": _in("s1", _knn),
        "knn_s2": _in("s2", _knn),
        "ens2_mean": lambda c: mean_of([_knn(c), _knn(sub(c, "s1_"))]),
        "ens3_mean": lambda c: mean_of([_knn(c), _knn(sub(c, "s1_")), _knn(sub(c, "s2_"))]),
        "soup2": lambda c: _knn(soup(c, ("", "s1_"))),
        "soup3": lambda c: _knn(soup(c, ("", "s1_", "s2_"))),
        "concat_base": lambda c: _knn(concat(c, ("", "base_"))),
        "concat_s1": lambda c: _knn(concat(c, ("", "s1_"))),
        "knn+0.5*base": lambda c: fuse(_knn(c), _knn(sub(c, "base_")), 0.5),
        "knn+1.0*base": lambda c: fuse(_knn(c), _knn(sub(c, "base_")), 1.0),
        "head_msp": _in("", _head, "msp"), "head_maxcos": _in("", _head, "maxcos"),
        "head_energy": _in("", _head, "energy"), "maha64": _in("", _maha, 64), "maha_full": _in("", _maha, 0),
        "knn_k3": _in("", _knn, k=3), "knn_k10": _in("", _knn, k=10),
        "knn_nocent": _in("", _knn, use_centroids=False),
    }
    for head in ("msp", "maxcos", "energy"):
        for weight in (0.5, 1.0, 2.0):
            v[f"knn+{weight}*{head}"] = _fused("", _head, weight, head)
    for weight in (0.5, 1.0):
        v[f"knn+{weight}*maha64"] = _fused("", _maha, weight, 64)
    for tag in TUNINGS:
        v[f"tune_{tag}"] = _in(tag, _knn)
        v[f"{tag}+0.5*maha64"] = _fused(tag, _maha, 0.5, 64)
        v[f"{tag}+0.5*maxcos"] = _fused(tag, _head, 0.5, "maxcos")
        v[f"{tag}_k3"] = _in(tag, _knn, k=3)
        v[f"{tag}_dims128"] = _in(tag, _knn, dims=128)
    return v


def summarise(data: dict[str, dict], fn: Callable[[dict], Scores]) -> dict[str, Any]:
    """Far AUROC, and per near fraction the mean over the seeds (and each seed's)."""
    row = {}
    for case, arrays in data.items():
        _, known, unknown = fn(arrays)
        row[case] = auroc(known, unknown)
    summary: dict[str, Any] = {"far": row["far"]}
    for fraction in FRACTIONS:
        tag = f"near{int(fraction * 100)}"
        summary[tag] = float(np.mean([row[f"{tag}_s{s}"] for s in SEEDS]))
        summary[tag + "_seeds"] = [round(row[f"{tag}_s{s}"], 4) for s in SEEDS]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", default=None)
    parser.add_argument("--tunings", nargs="*", default=[], help="tag=key:value,... e.g. m2=margin:0.2")
    args = parser.parse_args()
    for spec in args.tunings:
        tag, _, body = spec.partition("=")
        TUNINGS[tag] = {key: int(value) if key in ("epochs", "batch_size") else float(value)
                        for key, value in (part.split(":") for part in body.split(","))}
    from threadpoolctl import threadpool_limits

    from core.config import parse_settings
    from router.artifacts import create_embedder

    config = parse_settings({"router": {"embedder": "static", "artifacts_dir": str(ROOT / "var/models/router")},
                             "routes": [{"name": "r", "teacher": {"model": "openai/x"}}]}).router
    table = {}
    with threadpool_limits(limits=1):
        data = cases(create_embedder(config, cache_bytes=0))
        for name, fn in variants().items():
            if args.variants and name not in args.variants:
                continue
            table[name] = summary = summarise(data, fn)
            print(f"{name:24s} far {summary['far']:.4f}  near10 {summary['near10']:.4f}  "
                  f"near20 {summary['near20']:.4f} {summary['near20_seeds']}  near30 {summary['near30']:.4f}",
                  flush=True)
    (CACHE / "results.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
