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
import sys

COMMAND_MODULES = [
    "cli.serve",
    "cli.harness",
    "cli.report",
    "cli.router",
    "cli.student",
    "cli.training",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distillgate", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Per-call INFO lines from the HTTP and provider libraries drown the gateway's own log.
    for noisy in ("httpx", "httpcore", "LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
