"""``distillgate purge``: delete request and shadow rows older than the retention period.

``serve`` runs the same deletion every ``store.purge_interval_s`` when ``store.retention_days``
is set; this command is for a one-off purge (``--days`` overrides the config) or a cron job.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from core.config import settings_for_command


def purge(args: argparse.Namespace) -> int:
    from core.store import open_store
    from gateway.retention import retention_cutoff

    settings = settings_for_command(args.config)
    if settings is None:
        return 2
    days = args.days if args.days is not None else settings.store.retention_days
    if days is None:
        print("no retention period: set store.retention_days in the config or pass --days", flush=True)
        return 2
    cutoff = retention_cutoff(days)
    store = open_store(settings.store)
    try:
        counts = store.count_before(cutoff) if args.dry_run else store.purge_before(cutoff)
    finally:
        store.close()
    print(json.dumps({"retention_days": days, "cutoff": cutoff, "dry_run": args.dry_run,
                      ("would_delete" if args.dry_run else "deleted"): counts}))
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("purge", help="delete logged requests older than the retention period")
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--days", type=float, default=None, help="default: store.retention_days")
    parser.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    parser.set_defaults(func=purge)
