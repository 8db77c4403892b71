"""The ``demo`` command; the runner is imported only when the command runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _command(args: Any) -> int:
    from rich.console import Console

    from gateway.demo.runner import DemoOptions, run_demo

    overrides = {key: value for key, value in (("requests", args.requests), ("out", args.out)) if value is not None}
    options = DemoOptions.quick_defaults(**overrides) if args.quick else DemoOptions(**overrides)
    console = Console()
    result = run_demo(options, console)
    console.print_json(json.dumps({"overall": result["overall"], "heldout": result["heldout"],
                                   "goals": result["goals"]}))
    console.print(f"wrote {options.out / 'report.json'} and {options.out / 'savings.png'}")
    return 0 if result["overall"]["failed_requests"] == 0 else 1


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("demo", help="the whole loop on CLINC150 traffic, measured")
    parser.add_argument("--requests", type=int, default=None, help="stream length (default 10000; quick 2000)")
    parser.add_argument("--quick", action="store_true", help="a short run (under 10 minutes); what CI runs")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default var/demo)")
    parser.set_defaults(func=_command)
