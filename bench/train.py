"""The student's learning curve on the CLINC150 route: agreement, served share, cycle time cold and warm.

At each point of the curve (500, 1k, 2k, 3k, 5k teacher answers by default) the store holds
that many answers (CLINC150's labels, as the replay teacher would have given them) and two
training cycles run through ``Trainer.run`` (curation, training, evaluation, the gate):
*cold* retrains from the base on everything; *warm* starts from the previous point's
version and trains on the new answers plus a replay sample (the product's continual
training). Both are scored on the same fixed CLINC150 test prompts (never trained on):
agreement, validity, and the share and agreement of the answers the cascade would serve at
the version's own calibrated ``confidence_threshold`` (with the neighbours' vote, as served),
and the same with the version's learned router vetoing first (``learned_router`` per cycle:
served share with and without it at equal served agreement; README "The learned router").
Prints one JSON object: the last cycle's summary at the top level, the whole curve under ``curve``.

    PYTHONPATH=. .venv/bin/python bench/train.py --examples 500,1000,3000 --out var/bench/train.json
    PYTHONPATH=. .venv/bin/python bench/train.py --quick          # smoke run (tests)
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.config import RouteConfig, Settings, load_settings, parse_settings  # noqa: E402
from core.store import SQLiteStore  # noqa: E402
from trainer.seed import seed_teacher_answers  # noqa: E402

CLINC = ROOT / "data" / "clinc150" / "data_full.json"
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
ROUTE = "clinc-intents"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", default="500,1000,2000,3000,5000",
                        help="comma-separated points of the curve (teacher answers in the store)")
    parser.add_argument("--epochs", type=float, default=None, help="default: configs/default.yaml")
    parser.add_argument("--learning-rate", type=float, default=None, help="default: configs/default.yaml")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--holdout-fraction", type=float, default=0.1)
    parser.add_argument("--test-examples", type=int, default=600, help="fixed CLINC150 test prompts scored")
    parser.add_argument("--no-warm", action="store_true", help="cold cycles only")
    parser.add_argument("--base-dir", type=Path, default=None, help="student base (default: built in --work)")
    parser.add_argument("--pretrain-steps", type=int, default=0, help="when building the base")
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a temp dir)")
    parser.add_argument("--no-detector", dest="detector", action="store_false",
                        help="skip the router's detector (and so the neighbours' vote in the cascade)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 200 (cold) then 300 (warm) examples, 20 steps")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    args.points = [int(value) for value in str(args.examples).split(",") if value.strip()]
    if args.quick:
        args.points, args.max_steps, args.pretrain_steps, args.test_examples = [200, 300], 20, 0, 60
    return args


def clinc_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    splits = json.loads(CLINC.read_text())
    rows = [tuple(row) for row in splits["train"] + splits["oos_train"]]
    random.Random(seed).shuffle(rows)
    return rows[:count]


def test_pairs(count: int, seed: int = 1) -> list[tuple[str, str]]:
    """CLINC150 test prompts (5% out of scope, answered ``oos``): disjoint from the training split."""
    splits = json.loads(CLINC.read_text())
    in_scope, out_of_scope = [tuple(row) for row in splits["test"]], [tuple(row) for row in splits["oos_test"]]
    rng = random.Random(seed)
    rng.shuffle(in_scope)
    rng.shuffle(out_of_scope)
    return in_scope[: count - count // 20] + [(text, "oos") for text, _ in out_of_scope[: count // 20]]


def build_base(args: argparse.Namespace, work: Path) -> tuple[Path, float]:
    from trainer.dataset import labels_from_file
    from trainer.student_init import build_student_base, texts_from_clinc

    if args.base_dir is not None:
        return args.base_dir, 0.0
    started = time.perf_counter()
    labels = sorted(labels_from_file(CLINC))
    base = build_student_base(texts_from_clinc(CLINC), work / "base", pretrain_steps=args.pretrain_steps,
                              tokenizer_texts=labels)
    return base, time.perf_counter() - started


def make_settings(args: argparse.Namespace, work: Path, base: Path, *, warm: bool) -> Settings:
    """The default config's CLINC150 route (threshold, gate, training), pointed at this base."""
    default = load_settings(DEFAULT_CONFIG).route(ROUTE)
    assert default is not None, f"{DEFAULT_CONFIG} has no route {ROUTE}"
    training: dict[str, Any] = {**default.training.model_dump(), "holdout_fraction": args.holdout_fraction,
                                "warm_start": warm}
    for key in ("epochs", "learning_rate", "max_steps"):
        if getattr(args, key) is not None:
            training[key] = getattr(args, key)
    return parse_settings({
        "store": {"path": str(work / "bench.db")}, "vllm": {"model_dir": str(base)},
        "routes": [{"name": ROUTE, "teacher": {"model": "openai/replay-teacher"}, "labels_dataset": str(CLINC),
                    "student": {"system_prompt": default.student.system_prompt},
                    "confidence_threshold": default.confidence_threshold, "training": training,
                    "ood_detector": default.ood_detector, "ood_threshold": default.ood_threshold,
                    "cascade": default.cascade.model_dump(), "gate": default.gate.model_dump(),
                    "learned_router": default.learned_router.model_dump()}],
    })


def score_on_test(trainer: Any, route: RouteConfig, candidate: Any, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """The fixed test prompts, served as the gateway would serve this version: at its own
    calibrated threshold, its detector's neighbours voting."""
    from core.config import CascadeConfig
    from core.prompting import student_messages
    from trainer.dataset import Example, labels_for_route
    from trainer.evaluate import evaluate_adapter

    holdout = [Example(student_messages(route.student.system_prompt, [{"role": "user", "content": text}]), label,
                       text) for text, label in pairs]
    threshold = candidate.metrics["candidate"].get("confidence_threshold")
    fixed = CascadeConfig(**{**route.cascade.model_dump(), "target_agreement": None})
    result = evaluate_adapter(route.student.base_model, candidate.adapter_path, holdout,
                              labels=labels_for_route(route), cascade=fixed,
                              confidence_threshold=threshold if threshold is not None else 0.0,
                              neighbours=trainer.neighbours(route, holdout, candidate.detector_path))
    scores = {key: round(value, 4) if isinstance(value, float) else value
              for key, value in result.to_dict().items() if key != "wall_s"}
    return {**scores, "learned_router": learned_on_test(trainer, route, candidate, holdout, result)}


def served(agrees: list[bool], keep: list[bool]) -> dict[str, float]:
    count = sum(keep)
    return {"served_share": round(count / len(keep), 4),
            "served_agreement": round(sum(a for a, k in zip(agrees, keep, strict=True) if k) / count, 4) if count else 0.0}


def learned_on_test(trainer: Any, route: RouteConfig, candidate: Any, holdout: list[Any], result: Any) -> dict[str, Any]:
    """The version's learned router as a veto before its cascade, on the test prompts: what is
    served at the shipped threshold with and without it, and at equal served agreement (0.90,
    0.95) the most each can serve, the cascade threshold chosen on the test prompts themselves
    (the same advantage for both)."""
    from router.learned import LearnedRouter
    from router.ood import load_detector
    from router.tuned import detector_embeddings
    from trainer.cascade import calibrate_threshold

    trained = candidate.metrics.get("learned_router") or {}
    if "path" not in trained:
        return {"trained": trained}
    # As the gateway scores: the shared embedding for the learned router, the detector's own
    # (knn_tuned's tuned table) for the OOD score.
    texts = [example.prompt_text for example in holdout]
    embeddings = trainer.embedder().encode(texts)
    detector = load_detector(candidate.detector_path)
    p_agree = LearnedRouter.load(trained["path"]).predict_agree(
        embeddings, detector.score(detector_embeddings(detector, trainer.embedder(), texts)))
    passed = [bool(p >= route.learned_router.min_agree) for p in p_agree]
    cascade, agrees = result.cascade_scores, result.agrees
    threshold = result.confidence_threshold
    out: dict[str, Any] = {"trained": trained, "vetoed_share": round(1 - sum(passed) / len(passed), 4),
                           "shipped": {"cascade": served(agrees, [c >= threshold for c in cascade]),
                                       "with_learned": served(agrees, [c >= threshold and ok
                                                                       for c, ok in zip(cascade, passed, strict=True)])}}
    for target in (0.9, 0.95):
        row = {}
        for name, mask in (("cascade", [True] * len(passed)), ("with_learned", passed)):
            kept = [index for index, ok in enumerate(mask) if ok]
            best = calibrate_threshold([cascade[i] for i in kept], [agrees[i] for i in kept], target)
            row[name] = served(agrees, [ok and best is not None and c >= best
                                        for c, ok in zip(cascade, mask, strict=True)])
        out[f"at_agreement_{target}"] = row
    return out


def cycle(settings: Settings, store: SQLiteStore, work: Path, args: argparse.Namespace,
          tests: list[tuple[str, str]]) -> dict[str, Any]:
    """One ``Trainer.run``: its timings, the pipeline's gate and the fixed test set's scores."""
    from trainer.pipeline import Trainer

    embedder = None if args.detector else (lambda: None)
    trainer = Trainer(settings, store, adapters_root=work / "adapters", progress=not args.quick,
                      embedder_factory=embedder, fit_detector=args.detector)
    started = time.perf_counter()
    candidate = trainer.run(ROUTE)
    cycle_s = time.perf_counter() - started
    train, evaluation = candidate.metrics["train"], candidate.metrics["candidate"]
    return {
        "version": candidate.version, "status": candidate.status, "gate": candidate.metrics["gate"]["reason"],
        "warm_start_from": train.get("warm_start_from"), "cycle_wall_s": round(cycle_s, 2),
        "train_wall_s": round(train["wall_s"], 2), "trained_on": train["examples"], "steps": train["steps"],
        "epochs": round(train["epochs"], 2), "final_loss": round(train["final_loss"], 4),
        "train_examples_per_s": round(train["examples_per_s"], 1),
        "train_examples": candidate.train_examples, "holdout_examples": candidate.holdout_examples,
        "holdout": {key: round(value, 4) if isinstance(value, float) else value for key, value in evaluation.items()},
        "test": score_on_test(trainer, settings.routes[0], candidate, tests),
        "adapter_path": candidate.adapter_path,
    }


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from core.registry import Registry

    base, base_s = build_base(args, work)
    cold_settings = make_settings(args, work, base, warm=False)
    warm_settings = make_settings(args, work, base, warm=True)
    store = SQLiteStore(cold_settings.store.path)
    pairs, tests = clinc_pairs(max(args.points)), test_pairs(args.test_examples)
    seeded, start_at, curve = 0, time.time() - 86400, []
    for point in args.points:
        seed_teacher_answers(store, ROUTE, pairs[seeded:point], start_at=start_at + seeded * 1e-3)
        seeded = point
        live = Registry(store).live(ROUTE)
        row: dict[str, Any] = {"examples": point}
        if live is None or not args.quick:  # quick: one cold cycle, then warm ones (CI time)
            row["cold"] = cycle(cold_settings, store, work, args, tests)
        if live is not None and not args.no_warm:
            row["warm"] = cycle(warm_settings, store, work, args, tests)
        # The next point warm-starts from this one: promoted regardless of the gate, so the
        # chain measures continual training itself, not the gate.
        Registry(store).set_live(ROUTE, (row.get("warm") or row["cold"])["version"])
        curve.append(row)
        progress = {kind: {"test": row[kind]["test"], "cycle_wall_s": row[kind]["cycle_wall_s"]}
                    for kind in ("cold", "warm") if kind in row}
        print(json.dumps({"point": point, **progress}), file=sys.stderr)
    store.close()
    last = curve[-1].get("cold") or curve[-1]["warm"]
    route = cold_settings.routes[0]
    return {
        "benchmark": "train", "route": ROUTE, "machine": platform.machine(), "quick": args.quick,
        "base_build_s": round(base_s, 2), "cascade": route.cascade.model_dump(),
        "method": route.training.method, "lora_rank": route.training.lora_rank,
        "seeded_examples": seeded, "train_examples": last["train_examples"],
        "holdout_examples": last["holdout_examples"], "cycle_wall_s": last["cycle_wall_s"],
        "train_wall_s": last["train_wall_s"], "train_examples_per_s": last["train_examples_per_s"],
        "steps": last["steps"], "epochs": last["epochs"], "final_loss": last["final_loss"],
        "heldout_agreement": last["holdout"]["agreement"], "heldout_validity": last["holdout"]["validity"],
        "version": last["version"], "status": last["status"], "adapter_path": last["adapter_path"],
        "columns": ["examples", "agreement", "validity", "served_share", "served_agreement", "cold_cycle_s",
                    "warm_cycle_s", "warm_agreement", "warm_served_share", "warm_served_agreement"],
        "table": [_table_row(row) for row in curve], "curve": curve,
    }


def _table_row(row: dict[str, Any]) -> list[Any]:
    cold, warm = row.get("cold"), row.get("warm")
    return [row["examples"], cold and cold["test"]["agreement"], cold and cold["test"]["validity"],
            cold and cold["test"]["served_share"], cold and cold["test"]["served_agreement"],
            cold and cold["cycle_wall_s"], warm and warm["cycle_wall_s"],
            warm and warm["test"]["agreement"], warm and warm["test"]["served_share"],
            warm and warm["test"]["served_agreement"]]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="distillgate-bench-train-") as temporary:
        work = args.work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        result = run(args, work)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
