"""The ``distillgate`` command. One module per command group in ``cli/``.

A command module exposes ``register(subparsers)`` which adds its sub-command with
``set_defaults(func=...)``; ``func(args)`` returns the exit status. Command modules keep
heavy imports (torch, litellm, sentence-transformers) inside their functions so that
``distillgate --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from core.config_base import ConfigError

COMMAND_MODULES = [
    "cli.serve",
    "cli.harness",
    "cli.report",
    "cli.router",
    "cli.student",
    "cli.training",
    "cli.purge",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distillgate", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument("--log-format", choices=("json", "text"), default="json",
                        help="json (default): one object a line with every structured field; text: for a terminal")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        module.register(subparsers)
    return parser


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str, log_format: str) -> None:
    """Root logging to stderr. JSON keeps every ``extra=`` field (route, version, reason...),
    which a plain format string drops."""
    handler = logging.StreamHandler()
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


# Per-call INFO lines from the HTTP and provider libraries (httpx2: the openai 3.x SDK's) and
# apscheduler's two lines per job run (the leadership check runs every 5 s: 35,000 lines a day)
# drown the gateway's own log.
NOISY_LOGGERS = ("httpx", "httpx2", "httpcore", "LiteLLM", "LiteLLM Router", "LiteLLM Proxy",
                 "apscheduler.executors.default")


class ExpectedSchedulerSkips(logging.Filter):
    """Drops apscheduler's warning that a tick was skipped because the job still runs.

    A route's training job runs with ``max_instances=1``, so every tick that fires while a
    cycle trains (minutes) is skipped by design; the warning said so every interval. The
    scheduler's other warnings (a missed run, a job that failed) still pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in record.getMessage()


def quiet_libraries() -> None:
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    scheduler = logging.getLogger("apscheduler.scheduler")
    if not any(isinstance(existing, ExpectedSchedulerSkips) for existing in scheduler.filters):
        scheduler.addFilter(ExpectedSchedulerSkips())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Everything distillgate writes (database, spool, adapters, logs, the admin token) holds
    # prompts, answers or secrets: readable by its own user only (files 0600, folders 0700).
    os.umask(0o077)
    configure_logging(args.log_level, args.log_format)
    quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except ConfigError as error:  # e.g. a PostgreSQL store whose DSN variable is unset
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
