"""A candidate is judged on at least ``min_evaluation_examples`` answers: its holdout, topped up with
answers logged while it trained."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from core.config import Settings, parse_settings
from core.registry import Registry
from core.store import SQLiteStore
from trainer.dataset import build_dataset, fresh_examples
from trainer.pipeline import Trainer
from trainer.seed import seed_teacher_answers

ROUTE = "clinc-intents"


def _rows(clinc_path: Path, intents: int, start: int, stop: int) -> list[tuple[str, str]]:
    rows = json.loads(clinc_path.read_text())["train"]
    names = sorted({intent for _, intent in rows})[:intents]
    return [pair for intent in names for pair in [(t, i) for t, i in rows if i == intent][start:stop]]


def _settings(tmp: Path, base: Path, clinc_path: Path, minimum: int = 1000) -> Settings:
    return parse_settings({
        "store": {"path": str(tmp / "db.sqlite")}, "vllm": {"model_dir": str(base)},
        "routes": [{"name": ROUTE, "teacher": {"model": "openai/replay-teacher"}, "labels_dataset": str(clinc_path),
                    "student": {"system_prompt": "Intent label:"},
                    "training": {"holdout_fraction": 0.2, "min_evaluation_examples": minimum},
                    "gate": {"minimum": 0.0}}],
    })


def test_fresh_answers_are_the_newest_unseen_prompts(tmp_path: Path, clinc_path: Path) -> None:
    settings = _settings(tmp_path, tmp_path, clinc_path)
    store = SQLiteStore(settings.store.path)
    old = _rows(clinc_path, 3, 0, 10)
    seed_teacher_answers(store, ROUTE, old)
    dataset = build_dataset(store, settings.routes[0])
    assert fresh_examples(store, settings.routes[0], dataset, limit=5) == []  # nothing logged since
    new = _rows(clinc_path, 3, 10, 14)
    # A prompt the dataset holds, re-asked with other case and spacing, is not fresh evidence.
    repeat = ("  " + old[0][0].upper() + " ", old[0][1])
    seed_teacher_answers(store, ROUTE, [*new, repeat], start_at=time.time() + 100)
    fresh = fresh_examples(store, settings.routes[0], dataset, limit=5)
    assert [example.prompt_text for example in fresh] == [prompt for prompt, _ in new[-5:]]
    assert fresh_examples(store, settings.routes[0], dataset, limit=0) == []


def _train_then_log(monkeypatch: pytest.MonkeyPatch, store: SQLiteStore, pairs: list[tuple[str, str]]) -> None:
    """Answers logged while the candidate trains, as the gateway logs them during a real cycle."""
    import trainer.train

    real = trainer.train.train_adapter

    def train_while_traffic_arrives(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        seed_teacher_answers(store, ROUTE, pairs, start_at=time.time() + 100)
        return result

    monkeypatch.setattr(trainer.train, "train_adapter", train_while_traffic_arrives)


def test_a_candidate_is_judged_on_answers_logged_while_it_trained(
        tmp_path: Path, student_base_dir: Path, clinc_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(tmp_path, student_base_dir, clinc_path)
    store = SQLiteStore(settings.store.path)
    seed_teacher_answers(store, ROUTE, _rows(clinc_path, 5, 0, 12))
    during = _rows(clinc_path, 5, 12, 20)
    _train_then_log(monkeypatch, store, during)
    trainer = Trainer(settings, store, adapters_root=tmp_path / "adapters", fit_detector=False, progress=False,
                      train_overrides={"max_steps": 2})
    first = trainer.run(ROUTE)
    evaluated = first.metrics["evaluated_on"]
    assert evaluated["fresh"] == len(during) and evaluated["holdout"] == first.holdout_examples
    assert first.metrics["candidate"]["examples"] == first.holdout_examples + len(during)
    assert json.loads(store.training_runs(ROUTE)[0]["detail_json"])["dataset"]["fresh"] == len(during)

    # Only enough to reach the minimum: the holdout plus the three newest answers.
    Registry(store).set_live(ROUTE, first.version)
    _train_then_log(monkeypatch, store, _rows(clinc_path, 5, 20, 24))
    holdout = build_dataset(store, settings.routes[0]).holdout
    settings.routes[0].training.min_evaluation_examples = len(holdout) + 3
    second = trainer.run(ROUTE)
    assert second.metrics["evaluated_on"] == {"holdout": len(holdout), "fresh": 3}
    assert second.metrics["candidate"]["examples"] == second.metrics["live"]["examples"] == len(holdout) + 3
