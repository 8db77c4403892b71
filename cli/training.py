"""``distillgate train | versions | promote | rollback``: one function per command.

``train`` runs one cycle in this process (the scheduler runs it as a child process so the
gateway's latency is untouched). ``promote`` and ``rollback`` ask the running gateway's
admin API, because only the gateway holds the live route pointers and the vLLM adapters.
Heavy imports (torch, transformers, peft) stay inside the command functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from core.config import Settings, settings_for_command


def register(subparsers: Any) -> None:
    _register_train(subparsers)
    _register_versions(subparsers)
    _register_promote(subparsers)
    _register_rollback(subparsers)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/default.yaml", help="deployment YAML")
    parser.add_argument("--route", required=True, help="route name from the config")


def _settings(args: argparse.Namespace) -> Settings | None:
    return settings_for_command(args.config, args.route)


# -- distillgate train ------------------------------------------------------------------------
def _register_train(subparsers: Any) -> None:
    parser = subparsers.add_parser("train", help="run one training cycle for a route now (train, evaluate, gate)")
    _common(parser)
    parser.add_argument("--adapters-root", default=None,
                        help="where versions' adapters are written (default: the config's store.adapters_dir)")
    parser.add_argument("--max-steps", type=int, default=None, help="cap optimizer steps (smoke runs)")
    parser.add_argument("--no-detector", action="store_true", help="skip fitting the router's OOD detector")
    parser.add_argument("--json", action="store_true", help="print the new version as one JSON line")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (child processes, CI)")
    parser.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from core.store import open_store
    from trainer.pipeline import NotEnoughData, Trainer

    settings = _settings(args)
    if settings is None:
        return 2
    overrides = {"max_steps": args.max_steps} if args.max_steps else {}
    store = open_store(settings.store)
    try:
        trainer = Trainer(settings, store, adapters_root=args.adapters_root or settings.store.adapters_dir,
                          train_overrides=overrides, progress=not args.no_progress,
                          fit_detector=not args.no_detector)
        candidate = trainer.run(args.route)
    except NotEnoughData as error:
        print(f"not trained: {error}", file=sys.stderr)
        return 3
    finally:
        store.close()
    if args.json:
        print(json.dumps(candidate.to_dict(), default=str))
    else:
        gate = candidate.metrics.get("gate", {})
        print(f"{candidate.route} {candidate.version}: {candidate.status} ({gate.get('reason')}); "
              f"{gate.get('metric')} {gate.get('candidate')}, live {gate.get('live')}")
    return 0


# -- distillgate versions ---------------------------------------------------------------------
def _register_versions(subparsers: Any) -> None:
    parser = subparsers.add_parser("versions", help="list a route's student versions")
    _common(parser)
    parser.add_argument("--json", action="store_true", help="JSON instead of a table")
    parser.set_defaults(func=_run_versions)


def _run_versions(args: argparse.Namespace) -> int:
    from core.registry import Registry
    from core.store import open_store

    settings = _settings(args)
    if settings is None:
        return 2
    store = open_store(settings.store)
    try:
        versions = Registry(store).list(args.route)
    finally:
        store.close()
    if args.json:
        print(json.dumps([version.to_dict() for version in versions], default=str, indent=2))
        return 0
    _print_versions_table(args.route, versions)
    return 0


def _print_versions_table(route: str, versions: list[Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"student versions of {route}")
    for column in ("version", "status", "parent", "gate metric", "live", "served share", "threshold", "train",
                   "holdout", "note"):
        table.add_column(column)
    for version in versions:
        gate, candidate = version.metrics.get("gate", {}), version.metrics.get("candidate") or {}
        table.add_row(version.version, version.status, version.parent or "-", _fmt(gate.get("candidate")),
                      _fmt(gate.get("live")), _fmt(candidate.get("served_share")),
                      _fmt(candidate.get("confidence_threshold")), str(version.train_examples),
                      str(version.holdout_examples), (version.note or "")[:60])
    Console().print(table)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


# -- distillgate promote / rollback (through the running gateway) -----------------------------
def _register_promote(subparsers: Any) -> None:
    parser = subparsers.add_parser("promote", help="hot-swap a version in on the running gateway")
    _common(parser)
    parser.add_argument("--version", required=True, help="version to serve, e.g. v3")
    parser.add_argument("--gateway-url", default=None, help="default: the config's server host and port")
    parser.set_defaults(func=_run_promote)


def _register_rollback(subparsers: Any) -> None:
    parser = subparsers.add_parser("rollback", help="serve the previous live version again")
    _common(parser)
    parser.add_argument("--gateway-url", default=None, help="default: the config's server host and port")
    parser.set_defaults(func=_run_rollback)


def _run_promote(args: argparse.Namespace) -> int:
    return _admin_call(args, "promote", {"version": args.version})


def _run_rollback(args: argparse.Namespace) -> int:
    return _admin_call(args, "rollback", None)


def _admin_call(args: argparse.Namespace, action: str, payload: dict[str, Any] | None) -> int:
    import httpx

    settings = _settings(args)
    if settings is None:
        return 2
    url = args.gateway_url or f"http://{settings.server.host}:{settings.server.port}"
    token = settings.admin_token()
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.post(f"{url.rstrip('/')}/admin/routes/{args.route}/{action}", json=payload,
                              headers=headers, timeout=300.0)
    except httpx.HTTPError as error:
        print(f"gateway at {url} unreachable: {error}", file=sys.stderr)
        return 1
    print(response.text)
    return 0 if response.status_code == 200 else 1
