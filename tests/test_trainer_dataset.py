"""Dataset curation from the request log: filters, dedupe, the fixed growing holdout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import parse_settings
from core.prompting import student_messages
from core.store import SQLiteStore
from trainer.dataset import (
    build_dataset,
    count_new_examples,
    in_holdout,
    labels_from_file,
    normalize_answer,
    rejection_reason,
    strip_reasoning,
)
from trainer.seed import teacher_row

ROUTE = "intents"
LABELS = {"book_flight", "translate", "oos"}


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    return SQLiteStore(tmp_path / "db.sqlite")


def _route(holdout_fraction: float = 0.2):
    settings = parse_settings({"routes": [{
        "name": ROUTE, "teacher": {"model": "openai/x"},
        "student": {"system_prompt": "Intent:"}, "training": {"holdout_fraction": holdout_fraction}}]})
    return settings.routes[0]


def test_filters_and_counts_each_reason(store: SQLiteStore) -> None:
    rows = [
        teacher_row(ROUTE, "fly me to rome", "book_flight", created_at=1),
        teacher_row(ROUTE, "say hi in french", " Translate. ", created_at=2),  # normalized label
        teacher_row(ROUTE, "broken", "", created_at=3),
        teacher_row(ROUTE, "cut off", "book_fl", finish_reason="length", created_at=4),
        teacher_row(ROUTE, "naughty", "I'm sorry, but I can't help with that.", created_at=5),
        teacher_row(ROUTE, "unknown label", "make_coffee", created_at=6),
        teacher_row(ROUTE, "errored", "x", status_code=500, created_at=7),
        teacher_row(ROUTE, "student served", "book_flight", target="student", created_at=8),
        teacher_row("other-route", "fly me to rome", "book_flight", created_at=9),
    ]
    store.insert_requests(rows)
    dataset = build_dataset(store, _route(holdout_fraction=0.01), labels=LABELS)
    examples = dataset.train + dataset.holdout
    assert sorted(example.answer for example in examples) == ["book_flight", "translate"]
    assert dict(dataset.dropped) == {"empty": 1, "truncated": 1, "refusal": 1, "invalid_label": 1}
    # The student's prompt replaces the app's long system prompt; serving uses the same function.
    first = next(example for example in examples if example.answer == "book_flight")
    assert first.messages == student_messages("Intent:", [{"role": "user", "content": "fly me to rome"}])


def test_duplicates_keep_the_newest_answer(store: SQLiteStore) -> None:
    store.insert_requests([teacher_row(ROUTE, "fly me to rome", "translate", created_at=1),
                           teacher_row(ROUTE, "fly me to rome", "book_flight", created_at=2)])
    dataset = build_dataset(store, _route(), labels=LABELS)
    examples = dataset.train + dataset.holdout
    assert [example.answer for example in examples] == ["book_flight"]
    assert dataset.dropped["duplicate"] == 1


def test_json_requests_must_parse() -> None:
    request = {"response_format": {"type": "json_object"}}
    assert rejection_reason(request, '{"a": 1}', "stop", None) is None
    assert rejection_reason(request, "{not json", "stop", None) == "invalid_json"
    assert rejection_reason({}, "{not json", "stop", None) is None


def test_reasoning_is_stripped_for_validity_and_targets(store: SQLiteStore) -> None:
    assert strip_reasoning("<think>hmm, flights</think> book_flight") == "book_flight"
    store.insert_requests([teacher_row(ROUTE, "fly me", "<think>a trip</think>book_flight", created_at=1)])
    plain = build_dataset(store, _route(holdout_fraction=0.01), labels=LABELS)
    assert [example.answer for example in plain.train] == ["book_flight"]
    with_rationale = build_dataset(store, _route(holdout_fraction=0.01), keep_reasoning=True)
    assert with_rationale.train[0].answer == "<think>a trip</think>book_flight"


def test_holdout_is_fixed_and_grows(store: SQLiteStore) -> None:
    prompts = [f"request number {index}" for index in range(400)]
    store.insert_requests([teacher_row(ROUTE, prompt, "oos", created_at=index)
                           for index, prompt in enumerate(prompts[:200])])
    first = build_dataset(store, _route(), labels=LABELS)
    store.insert_requests([teacher_row(ROUTE, prompt, "oos", created_at=200 + index)
                           for index, prompt in enumerate(prompts[200:])])
    second = build_dataset(store, _route(), labels=LABELS)
    first_holdout = {example.prompt_text for example in first.holdout}
    second_holdout = {example.prompt_text for example in second.holdout}
    assert first_holdout < second_holdout  # grows, and no example left it
    assert not first_holdout & {example.prompt_text for example in second.train}
    assert 0.1 < len(second.holdout) / 400 < 0.3  # the configured 20%, give or take
    assert all(in_holdout(text, 0.2) for text in second_holdout)


def test_shadow_answers_are_training_data(store: SQLiteStore) -> None:
    served = teacher_row(ROUTE, "fly me to rome", "translate", target="student", created_at=1)
    store.insert_requests([served])
    teacher_response = {"choices": [{"message": {"content": "book_flight"}, "finish_reason": "stop"}]}
    store.insert_shadow_results([{"request_id": served["id"], "created_at": 2, "route": ROUTE,
                                  "student_answer": "translate", "teacher_answer": "book_flight",
                                  "teacher_response_json": json.dumps(teacher_response), "agree": 0}])
    dataset = build_dataset(store, _route(holdout_fraction=0.01), labels=LABELS)
    assert [(example.answer, example.source) for example in dataset.train] == [("book_flight", "shadow")]
    assert count_new_examples(store, ROUTE, after=0) == 1


def test_teacher_logprobs_are_kept() -> None:
    logprobs = [{"token": "oos", "logprob": -0.1, "top_logprobs": [{"token": "oos", "logprob": -0.1}]}]
    row = teacher_row(ROUTE, "what is love", "oos", logprobs=logprobs)
    store_response = json.loads(row["response_json"])
    assert store_response["choices"][0]["logprobs"]["content"] == logprobs


def test_labels_from_clinc(clinc_path: Path) -> None:
    labels = labels_from_file(clinc_path)
    assert len(labels) == 151 and "oos" in labels and "translate" in labels
    assert normalize_answer('  "Book_Flight." ') == "book_flight"
