"""Corrections from ``POST /v1/feedback`` as training targets: curated from a real SQLite file
the way the trainer reads it (trainer/dataset.py), train split and holdout alike."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from core.config import parse_settings
from core.store import SQLiteStore
from trainer.dataset import Example, build_dataset
from trainer.seed import teacher_row

ROUTE = "intents"
LABELS = {"book_flight", "translate", "oos"}


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    return SQLiteStore(tmp_path / "db.sqlite")


def _route(holdout_fraction: float) -> Any:
    """0.001: every prompt here trains; 0.999: every one is held out."""
    settings = parse_settings({"routes": [{
        "name": ROUTE, "teacher": {"model": "openai/x"},
        "student": {"system_prompt": "Intent:"}, "training": {"holdout_fraction": holdout_fraction}}]})
    return settings.routes[0]


def _feedback(store: SQLiteStore, row: dict[str, Any], *, correction: str | None = None, rating: str | None = None,
              trusted: bool = True, at: float | None = None) -> None:
    """A feedback row as the gateway writes it for the key that sent ``row``."""
    store.insert_feedback({"request_id": row["id"], "route": row["route"], "target": row["target"],
                           "client_key_id": row.get("client_key_id"), "train_trusted": int(trusted),
                           "rating": rating, "score": None, "correction": correction, "comment": None,
                           "created_at": at if at is not None else time.time()})


def _answers(examples: list[Example]) -> dict[str, str]:
    return {example.prompt_text: example.answer for example in examples}


@pytest.mark.parametrize("holdout_fraction", [0.001, 0.999])
def test_a_trusted_correction_replaces_the_teacher_answer_in_train_and_holdout(
        store: SQLiteStore, holdout_fraction: float) -> None:
    wrong = teacher_row(ROUTE, "fly me to rome", "translate", created_at=10)
    right = teacher_row(ROUTE, "say hi in french", "translate", created_at=11)
    store.insert_requests([wrong, right])
    _feedback(store, wrong, correction="oos", at=20)
    _feedback(store, wrong, correction=" Book_Flight ", at=30)  # the newest correction wins, normalised
    _feedback(store, wrong, rating="down", at=40)  # a later rating alone changes nothing
    _feedback(store, right, correction="oos", trusted=False, at=50)  # an untrusted key's correction is ignored
    dataset = build_dataset(store, _route(holdout_fraction), labels=LABELS)
    split, other = (dataset.holdout, dataset.train) if holdout_fraction > 0.5 else (dataset.train, dataset.holdout)
    assert other == []
    assert _answers(split) == {"fly me to rome": "book_flight", "say hi in french": "translate"}
    corrected = next(example for example in split if example.prompt_text == "fly me to rome")
    # Dated by the correction: a warm start counts it as new data the live adapter never saw.
    assert corrected.corrected and corrected.created_at == 30 and corrected.teacher_logprobs is None
    assert dataset.newest_at == 30


def test_a_corrected_student_answer_becomes_an_example(store: SQLiteStore) -> None:
    corrected = teacher_row(ROUTE, "fly me to rome", "translate", target="student", created_at=1)
    uncorrected = teacher_row(ROUTE, "say hi in french", "translate", target="student", created_at=2)
    rated_only = teacher_row(ROUTE, "good morning in german", "oos", target="student", created_at=3)
    untrusted_row = {**teacher_row(ROUTE, "book me a flight", "oos", target="student", created_at=4),
                     "train_trusted": 0}
    store.insert_requests([corrected, uncorrected, rated_only, untrusted_row])
    _feedback(store, corrected, correction="book_flight")
    _feedback(store, rated_only, rating="down")
    _feedback(store, untrusted_row, correction="book_flight")  # the request's own key is not trusted
    dataset = build_dataset(store, _route(0.001), labels=LABELS)
    assert _answers(dataset.train) == {"fly me to rome": "book_flight"}
    assert dataset.train[0].source == "correction" and dataset.train[0].request_id == corrected["id"]
    assert dataset.dropped["untrusted_key"] == 1


def test_a_correction_of_a_shadowed_answer_replaces_the_shadow_teacher(store: SQLiteStore) -> None:
    served = teacher_row(ROUTE, "fly me to rome", "book_flight", target="student", created_at=1)
    store.insert_requests([served])
    store.insert_shadow_results([{"request_id": served["id"], "created_at": 2.0, "route": ROUTE,
                                  "student_version": "v1", "student_answer": "book_flight",
                                  "teacher_answer": "translate", "agree": 0}])
    _feedback(store, served, correction="book_flight", at=3)
    dataset = build_dataset(store, _route(0.001), labels=LABELS)
    assert [(example.source, example.answer) for example in dataset.train] == [("shadow", "book_flight")]


def test_a_correction_wins_over_a_newer_teacher_answer_to_the_same_prompt(store: SQLiteStore) -> None:
    first = teacher_row(ROUTE, "fly me to rome", "translate", created_at=1)
    again = teacher_row(ROUTE, "fly me to rome", "translate", created_at=100)  # the teacher repeats its mistake
    store.insert_requests([first, again])
    _feedback(store, first, correction="book_flight", at=2)
    dataset = build_dataset(store, _route(0.001), labels=LABELS)
    assert _answers(dataset.train) == {"fly me to rome": "book_flight"}
    assert dataset.dropped["duplicate"] == 1


def test_an_unfit_correction_drops_the_row(store: SQLiteStore) -> None:
    row = teacher_row(ROUTE, "fly me to rome", "translate", created_at=1)
    store.insert_requests([row])
    _feedback(store, row, correction="make_coffee")  # not one of the route's labels
    dataset = build_dataset(store, _route(0.001), labels=LABELS)
    assert dataset.train == [] and dataset.holdout == []
    assert dict(dataset.dropped) == {"correction_invalid_label": 1}
