"""``distillgate eval-ood`` and ``distillgate calibrate``: the router's operator commands.

Heavy imports (sentence-transformers, scipy, matplotlib, the store) stay inside the command
functions so ``distillgate --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    evaluate = subparsers.add_parser("eval-ood", help="OOD detector benchmark on a CLINC150-format file")
    evaluate.add_argument("--data", required=True, type=Path, help="JSON file of splits train/test/oos_test")
    evaluate.add_argument("--detector", default="knn", choices=["knn", "knn_lda", "knn_tuned", "mahalanobis"])
    evaluate.add_argument("--embedder", default="static", choices=["minilm", "static", "onnx"],
                          help="built under --artifacts-dir on first use")
    evaluate.add_argument("--artifacts-dir", type=Path, default=Path("var/models/router"))
    evaluate.add_argument("--protocol", default="both", choices=["far", "near", "both"],
                          help="far: test vs oos_test; near: whole in-scope intents held out as unknown")
    evaluate.add_argument("--seeds", default="0,1,2", help="near protocol: one held-out draw per seed")
    evaluate.add_argument("--holdout-fraction", type=float, default=0.2, help="near protocol: share of intents")
    evaluate.add_argument("--max-train", type=int, default=None, help="subsample train (speed)")
    evaluate.add_argument("--max-eval", type=int, default=None, help="subsample test and oos_test")
    evaluate.add_argument("--json", action="store_true", help="print JSON only")
    evaluate.set_defaults(func=eval_ood_command)

    init = subparsers.add_parser("init-router", help="build the router's embedder from the packaged MiniLM (offline)")
    init.add_argument("--config", default="configs/default.yaml", type=Path)
    init.add_argument("--embedder", default=None, choices=["minilm", "static", "onnx"],
                      help="default: the config's router.embedder")
    init.add_argument("--force", action="store_true", help="rebuild even when built")
    init.set_defaults(func=init_router_command)

    calibrate = subparsers.add_parser("calibrate", help="choose a route's ood_threshold from shadow data")
    calibrate.add_argument("--config", required=True, type=Path)
    calibrate.add_argument("--route", required=True)
    calibrate.add_argument("--target-agreement", type=float, default=0.97)
    calibrate.add_argument("--confidence", type=float, default=0.95, help="confidence level of the bound")
    calibrate.add_argument("--pairs", type=Path, default=None,
                           help="extra JSONL of {ood_score, agree} (held-out evaluations)")
    calibrate.add_argument("--apply", action="store_true", help="set the recommended threshold live")
    calibrate.add_argument("--gateway-url", default=None, help="default: the config's server host:port")
    calibrate.add_argument("--out", type=Path, default=Path("var/calibration"), help="PNG and JSON go here")
    calibrate.add_argument("--json", action="store_true", help="print the result as JSON")
    calibrate.set_defaults(func=calibrate_command)


def init_router_command(args: argparse.Namespace) -> int:
    from core.config import settings_for_command
    from router.artifacts import build_embedder, ensure_embedder

    settings = settings_for_command(args.config)
    if settings is None:
        return 2
    kind = args.embedder or settings.router.embedder
    built = (build_embedder if args.force else ensure_embedder)(kind, settings.router.artifacts_dir)
    print(f"router embedder {kind}: {built or 'the packaged MiniLM (nothing to build)'}")
    return 0


def eval_ood_command(args: argparse.Namespace) -> int:
    from router.artifacts import create_embedder
    from router.eval_ood import evaluate

    try:
        seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
        embedder = create_embedder(argparse.Namespace(embedder=args.embedder, artifacts_dir=args.artifacts_dir,
                                                      cache_mb=64.0), build=True)
        result = evaluate(args.data, args.detector, embedder=embedder, max_train=args.max_train,
                          max_eval=args.max_eval, protocol=args.protocol, seeds=seeds,
                          holdout_fraction=args.holdout_fraction)
    except (OSError, ValueError) as error:
        print(f"error: {error}")
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    _print_eval(result)
    return 0


def _print_eval(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"OOD detector {result['detector']} ({result['embedder']}) on {result['data']}")
    for column in ("protocol", "AUROC", "FPR@95%TPR", "OOS recall@95% kept", "rows"):
        table.add_column(column, justify="right")
    if "auroc" in result:
        table.add_row("far (oos_test)", f"{result['auroc']:.4f}", f"{result['fpr_at_95_tpr']:.4f}",
                      f"{result['oos_recall_at_95_inscope']:.4f}", f"{result['test']} / {result['oos_test']}")
    for row in (result.get("near") or {}).get("seeds", []):
        table.add_row(f"near, seed {row['seed']}", f"{row['auroc']:.4f}", f"{row['fpr_at_95_tpr']:.4f}",
                      f"{row['oos_recall_at_95_inscope']:.4f}", f"{row['known']} / {row['unknown']}")
    if "near" in result:
        mean = result["near"]["mean"]
        table.add_row("near, mean", f"{mean['auroc']:.4f}", f"{mean['fpr_at_95_tpr']:.4f}",
                      f"{mean['oos_recall_at_95_inscope']:.4f}", "")
    console = Console()
    console.print(table)
    if "latency_ms" in result:
        console.print(f"embed + score, one new prompt: p50 {result['latency_ms']['p50']:.3f} ms, "
                      f"p99 {result['latency_ms']['p99']:.3f} ms")


def _shadow_pairs(store: Any, route: str) -> list[tuple[float, int]]:
    return [(float(row["router_score"]), int(row["agree"])) for row in store.iter_shadow_results(route)
            if row.get("router_score") is not None and row.get("agree") is not None]


def _file_pairs(path: Path) -> list[tuple[float, int]]:
    pairs = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            pairs.append((float(row["ood_score"]), int(row["agree"])))
    return pairs


def _costs(store: Any, route: str) -> tuple[float, float]:
    """Average teacher and student cost per request from the request log (1, 0 when unknown)."""
    from core.store.reporting import average_costs

    teacher, student = average_costs(store, route)
    if not teacher:
        return 1.0, 0.0
    return float(teacher), float(student or 0.0)


def calibrate_command(args: argparse.Namespace) -> int:
    from core.config import settings_for_command
    from core.store import open_store
    from router.calibration import calibrate, plot

    settings = settings_for_command(args.config, args.route)
    if settings is None:
        return 2
    store = open_store(settings.store)
    try:
        pairs = _shadow_pairs(store, args.route) + (_file_pairs(args.pairs) if args.pairs else [])
        teacher_cost, student_cost = _costs(store, args.route)
        result = calibrate(pairs, target_agreement=args.target_agreement, confidence=args.confidence,
                           teacher_cost=teacher_cost, student_cost=student_cost)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"calibration-{args.route}.json").write_text(result.model_dump_json(indent=2))
        png = plot(result, args.out / f"calibration-{args.route}.png", args.route) if result.curve else None
        _print_result(result, args, png)
        if not args.apply:
            return 0
        if result.recommended_threshold is None:
            print("nothing applied: no threshold is certified")
            return 1
        return _apply(settings, store, args, result.recommended_threshold)
    finally:
        store.close()


def _print_result(result: Any, args: argparse.Namespace, png: Path | None) -> None:
    if args.json:
        print(result.model_dump_json(indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"calibration of {args.route}: {result.pairs} (score, agree) pairs")
    for column in ("ood_threshold", "student share", "agreement", f"agreement ≥ ({result.confidence:.0%})",
                   "cost vs teacher", "certified"):
        table.add_column(column, justify="right")
    step = max(1, len(result.curve) // 15)
    shown = result.curve[::step] + ([result.recommended] if result.recommended else [])
    for point in sorted({id(p): p for p in shown}.values(), key=lambda p: p.threshold):
        mark = " ◀" if point is result.recommended else ""
        table.add_row(f"{point.threshold:.4f}{mark}", f"{point.student_share:.1%}", f"{point.agreement:.3f}",
                      f"{point.agreement_lcb:.3f}", f"{point.relative_cost:.2f}", "yes" if point.certified else "")
    console.print(table)
    console.print(f"guarantee: {result.guarantee}, confidence {result.confidence:.0%}, "
                  f"target agreement {result.target_agreement:.3f} on student-served requests")
    if result.recommended is not None:
        point = result.recommended
        console.print(f"recommended ood_threshold = {point.threshold:.4f}: student share {point.student_share:.1%}, "
                      f"agreement {point.agreement:.3f} (≥ {point.agreement_lcb:.3f} with "
                      f"{result.confidence:.0%} confidence)")
    if result.note:
        console.print(f"note: {result.note}")
    if png is not None:
        console.print(f"curve saved to {png}")


def _apply(settings: Any, store: Any, args: argparse.Namespace, threshold: float) -> int:
    """PATCH the running gateway's admin API; without a reachable gateway, persist directly."""
    import httpx

    url = (args.gateway_url or f"http://{settings.server.host}:{settings.server.port}").rstrip("/")
    token = settings.admin_token() or ""
    changes = {"ood_threshold": round(threshold, 6)}
    try:
        response = httpx.patch(f"{url}/admin/routes/{args.route}", json=changes,
                               headers={"Authorization": f"Bearer {token}"}, timeout=5.0)
    except httpx.TransportError as error:
        # Same persistence the admin API uses; a gateway started later reads it at startup.
        store.set_route_overrides(args.route, changes, actor="calibrate")
        logger.info("calibration applied to the store", extra={"route": args.route, "reason": str(error)})
        print(f"gateway at {url} not reachable ({error.__class__.__name__}); "
              f"saved ood_threshold={changes['ood_threshold']} to the store (effective at next gateway start)")
        return 0
    if response.status_code >= 400:
        print(f"error: gateway refused the change ({response.status_code}): {response.text[:300]}")
        return 1
    print(f"applied ood_threshold={changes['ood_threshold']} to {args.route} on {url}")
    return 0
