"""The harness commands: ``demo`` (the whole loop, measured) and ``replay-teacher`` (the
stand-in for a frontier API). Their modules are imported only when a command runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _run_demo(args: Any) -> int:
    from rich.console import Console

    from cli.main import quiet_libraries

    quiet_libraries()  # the SDK's HTTP client logs every request: thousands of lines over the live table

    from harness.demo.runner import DemoOptions, run_demo

    overrides = {key: value for key, value in (("requests", args.requests), ("out", args.out),
                                               ("shift_at", args.shift_at), ("shift_share", args.shift_share),
                                               ("tools", args.tools))
                 if value is not None}
    options = DemoOptions.quick_defaults(**overrides) if args.quick else DemoOptions(**overrides)
    console = Console()
    result = run_demo(options, console)
    savings = {key: result["savings"][key] for key in ("actual_cost_usd", "all_teacher_cost_usd", "shadow_cost_usd",
                                                       "training_cost_usd", "net_savings_usd", "break_even_request")}
    console.print_json(json.dumps({"overall": result["overall"], "loop": result["loop"], "heldout": result["heldout"],
                                   "savings": savings, "rollout": result["rollout"]}))
    if result.get("shift") is not None:
        console.print(_shift_table(result["shift"]))
    console.print(_goals_table(result["goals"]))
    if "tools" in result:
        from harness.demo.tools_route import console_table

        console.print(console_table(result["tools"]))
        console.print_json(json.dumps({"tools": {key: result["tools"][key] for key in ("overall", "versions")}}))
    console.print(f"wrote {options.out / 'report.json'} and {options.out / 'savings.png'}"
                  + (f" and {options.out / 'tools.png'}" if "tools" in result else ""))
    failed = result["overall"]["failed_requests"] + result["heldout"]["failed_requests"]
    return 0 if failed == 0 else 1


def _goals_table(goals: dict[str, dict[str, Any]]) -> Any:
    from rich.table import Table

    shifted = any(name.startswith("shift:") for name in goals)
    table = Table(title="goals (issue 11" + ("; shift: issue 17)" if shifted else ")"))
    for column in ("goal", "figure", "target", "status", "note"):
        table.add_column(column)
    colours = {"met": "green", "not met": "red", "undefined": "yellow"}
    for name, goal in goals.items():
        status = goal["status"]
        table.add_row(name, "—" if goal["figure"] is None else str(goal["figure"]), goal["target"],
                      f"[{colours.get(status, 'white')}]{status}[/]", goal["note"] or "")
    return table


def _shift_table(shift: dict[str, Any]) -> Any:
    """The shift phase: when it came, when drift started a retrain, and the new intents'
    figures before vs after the version promoted after it."""
    from rich.table import Table

    version = shift["version_after_drift"]
    promoted = f"{version['version']} after request {version['promoted_after_request']:,}" if version else "—"
    table = Table(title=f"shift at request {shift['at_request']:,}: {len(shift['held_back_intents'])} new intents; "
                        f"first drift retrain after request {shift['first_drift_retrain_request'] or '—'}; "
                        f"then promoted: {promoted}")
    for column in ("new intents", "requests", "student share", "accuracy", "student's accuracy", "answered by"):
        table.add_column(column)
    for name, figures in (("before", shift["new_intents_before"]), ("after", shift["new_intents_after"]),
                          ("held out (final)", shift.get("heldout_new_intents"))):
        if figures is None:
            table.add_row(name, "—", "—", "—", "—", "—")
            continue
        cells = [figures[key] for key in ("student_share", "accuracy", "student_accuracy")]
        table.add_row(name, str(figures["requests"]), *("—" if cell is None else f"{cell:.1%}" for cell in cells),
                      ", ".join(f"{v}: {n}" for v, n in sorted(figures["student_versions"].items())) or "teacher")
    return table


def _register_demo(subparsers: Any) -> None:
    parser = subparsers.add_parser("demo", help="the whole loop on CLINC150 traffic, measured")
    parser.add_argument("--requests", type=int, default=None, help="stream length (default 10000; quick 2000)")
    parser.add_argument("--quick", action="store_true", help="a short run (under 10 minutes); what CI runs")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default var/demo)")
    parser.add_argument("--shift-at", type=int, default=None,
                        help="the shift phase: held-back intents join the traffic from this request on (default: none)")
    parser.add_argument("--shift-share", type=float, default=None,
                        help="share of the intents held back until --shift-at (default 0.2: two CLINC150 domains)")
    parser.add_argument("--tools", action="store_true", default=None,
                        help="add the tool-calling route (clinc-tools) beside the main one; writes tools.png")
    parser.set_defaults(func=_run_demo)


def _register_replay_teacher(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "replay-teacher", help="serve the replay teacher, a stand-in for a frontier API (offline)"
    )
    parser.add_argument("--dataset", type=Path, default=Path("data/clinc150/data_full.json"),
                        help="CLINC150-format JSON: splits of [utterance, intent]")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--model-name", default="replay-teacher")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="mean delay before answering")
    parser.add_argument("--latency-jitter-ms", type=float, default=0.0,
                        help="standard deviation of the (lognormal) delay")
    parser.add_argument("--error-rate", type=float, default=0.0, help="share of calls answered 500/429")
    parser.add_argument("--accuracy", type=float, default=1.0, help="share of utterances answered correctly")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_run_replay_teacher)


def _run_replay_teacher(args: Any) -> int:
    from harness.replay_teacher import ReplayOptions, serve_replay_teacher

    options = ReplayOptions(
        dataset=args.dataset, model_name=args.model_name, latency_ms=args.latency_ms,
        latency_jitter_ms=args.latency_jitter_ms, error_rate=args.error_rate,
        accuracy=args.accuracy, seed=args.seed,
    )
    serve_replay_teacher(options, host=args.host, port=args.port)
    return 0


def register(subparsers: Any) -> None:
    _register_demo(subparsers)
    _register_replay_teacher(subparsers)
