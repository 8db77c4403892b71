"""The trainer's ``distillgate`` commands. One ``_register_<command>`` function per command.

Add a command by writing its ``_register_...`` and ``_run_...`` pair and calling the former
from :func:`register`. Heavy imports (torch, transformers, tokenizers) stay inside ``_run_*``
so ``distillgate --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from core.config import ConfigError, RouteConfig, Settings, load_settings

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    _register_init_student(subparsers)


# -- distillgate init-student ------------------------------------------------------------------
def _register_init_student(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "init-student",
        help="build a route's small student base model and tokenizer locally (offline/CPU path)",
    )
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--route", required=True, help="route name from the config")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: the route's student.base_model)")
    parser.add_argument("--texts", type=Path, default=None,
                        help="unlabelled prompts: a CLINC150-format JSON (train split) or a text file, "
                             "one per line (default: the route's labels_dataset, else the replay dataset)")
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="causal-LM pretraining steps on the prompts, never the labels "
                             "(default: the route's student.pretrain_steps)")
    parser.add_argument("--vocab-size", type=int, default=8192)  # trainer.student_init.DEFAULT_VOCAB_SIZE
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if the model exists")
    parser.set_defaults(func=_run_init_student)


def _texts_source(args: argparse.Namespace, settings: Settings, route: RouteConfig) -> Path:
    if args.texts is not None:
        return Path(args.texts)
    if route.labels_dataset is not None:
        return route.labels_dataset
    if settings.replay_teacher is not None:
        return settings.replay_teacher.dataset
    raise ConfigError(f"route {route.name} has no dataset to build a tokenizer from: pass --texts")


def _read_texts(path: Path) -> list[str]:
    from trainer.student_init import texts_from_clinc

    if path.suffix == ".json":
        return texts_from_clinc(path)
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _label_names(route: RouteConfig) -> list[str]:
    """A label route's answers: given to the tokenizer (not the pretraining) so they encode compactly."""
    if route.labels_dataset is None:
        return []
    splits = json.loads(Path(route.labels_dataset).read_text())
    return sorted({intent for split in splits.values() for _text, intent in split})


def _run_init_student(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
        route = settings.route(args.route)
        if route is None:
            raise ConfigError(f"no route named {args.route!r} in {args.config}")
        source = _texts_source(args, settings, route)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    from trainer.student_init import build_student_base

    out_dir = args.out or Path(route.student.base_model)
    model_dir = build_student_base(
        _read_texts(source), out_dir, vocab_size=args.vocab_size,
        pretrain_steps=route.student.pretrain_steps if args.pretrain_steps is None else args.pretrain_steps,
        seed=args.seed, tokenizer_texts=_label_names(route), force=args.force,
    )
    print(f"student base model for route {route.name}: {model_dir}")
    return 0
