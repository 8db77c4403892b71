"""``POST /v1/feedback`` in process: real uvicorn in a thread, the official SDK for the answers,
the replay teacher and a mock vLLM student (tests/operators.py), a temp SQLite store."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from rich.console import Console

from cli.report import render_table
from core.config import Settings
from core.store import SQLiteStore, reporting
from gateway.auth import key_id
from tests.helpers import UvicornThread, sdk
from tests.operators import STUDENT_SETTINGS, messages, operator_app, scrape, total
from trainer.dataset import build_dataset

ROUTE = "clinc-intents"
TRUSTED, OTHER = "trusted-key-1", "other-key-2"
STUDENT_UTTERANCE = "please set a 4 minute timer"  # the mock student answers "transfer": wrong
TEACHER_UTTERANCE = "does ireland have any travel alerts i should be aware of"  # OOD: the teacher answers


@pytest.fixture
def settings(make_settings: Callable[..., Settings], replay_teacher: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("FEEDBACK_TRUSTED_KEY", TRUSTED)
    monkeypatch.setenv("FEEDBACK_OTHER_KEY", OTHER)
    # Rows reach the store up to 2 s after their answer: feedback given at once must still find them.
    return make_settings(replay_teacher, route=STUDENT_SETTINGS, store={"flush_interval_s": 2.0}, auth={"keys": [
        {"key_env": "FEEDBACK_TRUSTED_KEY", "trusted_for_training": True}, {"key_env": "FEEDBACK_OTHER_KEY"}]})


def _ask(url: str, key: str, utterance: str) -> tuple[str, str, str]:
    """(completion id, x-request-id, target) of one answer through the SDK."""
    raw = sdk(url, key).chat.completions.with_raw_response.create(model=ROUTE, messages=messages(utterance))
    return raw.parse().id, raw.headers["x-request-id"], raw.headers["x-distillgate-target"]


def _feedback(url: str, key: str | None, body: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}/v1/feedback", content=content, headers={**headers, "content-type": "application/json"})


def _rows(settings: Settings, table: str) -> list[dict[str, Any]]:
    with sqlite3.connect(settings.store.path) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute(f"select * from {table} order by created_at")]


def _openai_error(response: httpx.Response) -> openai.APIStatusError:
    """The body as the OpenAI SDK reads an error: the envelope every endpoint answers in."""
    error = openai.OpenAI(api_key="x")._make_status_error_from_response(response)
    assert error.body is not None and set(error.body) == {"message", "type", "param", "code"}
    return error


def test_feedback_on_own_answers_is_stored_counted_reported_and_trained_on(settings: Settings) -> None:
    with UvicornThread(operator_app(settings)) as server:
        student_id, student_request, student_target = _ask(server.url, TRUSTED, STUDENT_UTTERANCE)
        _, teacher_request, teacher_target = _ask(server.url, TRUSTED, TEACHER_UTTERANCE)
        assert (student_target, teacher_target) == ("student", "teacher")
        assert student_id == f"chatcmpl-{student_request}"
        # By the completion's id, while the request's row is still queued for the store.
        down = _feedback(server.url, TRUSTED, {"request_id": student_id, "rating": "down", "comment": "not a transfer"})
        assert down.status_code == 200, down.text
        assert down.json()["request_id"] == student_request and down.json()["object"] == "feedback"
        corrected = _feedback(server.url, TRUSTED, {"request_id": teacher_request, "rating": "up", "score": 0.25,
                                                    "correction": "travel_notification"})
        assert corrected.status_code == 200, corrected.text
        samples = scrape(server.url)
    assert total(samples, "distillgate_feedback_total", route=ROUTE, target="student", rating="down") == 1
    assert total(samples, "distillgate_feedback_total", route=ROUTE, target="teacher", rating="up") == 1
    assert total(samples, "distillgate_feedback_total") == 2

    rows = {row["request_id"]: row for row in _rows(settings, "feedback")}
    assert rows[student_request]["target"] == "student" and rows[student_request]["comment"] == "not a transfer"
    assert rows[teacher_request]["score"] == 0.25 and rows[teacher_request]["correction"] == "travel_notification"
    assert {(row["client_key_id"], row["train_trusted"]) for row in rows.values()} == {(key_id(TRUSTED), 1)}
    store = SQLiteStore(settings.store.path)
    try:
        [summary] = reporting.route_summaries(store, [ROUTE])
        examples = build_dataset(store, settings.routes[0])
    finally:
        store.close()
    assert (summary.student_feedback, summary.student_ratings, summary.student_thumbs_down_share) == (1, 1, 1.0)
    console = Console(width=250, record=True)
    console.print(render_table([summary], "all"))
    assert "1 (100.0% down)" in console.export_text()  # distillgate report's "student feedback" column
    answers = {example.prompt_text: example.answer for example in examples.train + examples.holdout}
    assert answers[TEACHER_UTTERANCE] == "travel_notification"  # the correction, not the teacher's travel_alert


def test_only_the_key_that_sent_a_request_can_rate_it(settings: Settings) -> None:
    with UvicornThread(operator_app(settings)) as server:
        _, request_id, _ = _ask(server.url, TRUSTED, TEACHER_UTTERANCE)
        _, own_id, _ = _ask(server.url, OTHER, TEACHER_UTTERANCE)
        someone_elses = _feedback(server.url, OTHER, {"request_id": request_id, "rating": "down"})
        unknown = _feedback(server.url, OTHER, {"request_id": "0" * 32, "rating": "down"})
        anonymous = _feedback(server.url, None, {"request_id": request_id, "rating": "down"})
        own = _feedback(server.url, OTHER, {"request_id": own_id, "correction": "travel_notification"})
        samples = scrape(server.url)
    # Another key's request reads exactly as an unknown one: its existence is not told.
    assert someone_elses.status_code == unknown.status_code == 404
    assert _openai_error(someone_elses).body["param"] == "request_id"  # type: ignore[index]
    assert someone_elses.json()["error"]["message"].replace(request_id, "ID") == \
        unknown.json()["error"]["message"].replace("0" * 32, "ID")
    assert anonymous.status_code == 401 and _openai_error(anonymous).code == "invalid_api_key"
    assert own.status_code == 200
    assert total(samples, "distillgate_feedback_total") == 1
    [row] = _rows(settings, "feedback")
    # The other key is not trusted for training: its correction is kept but never trained on.
    assert (row["request_id"], row["client_key_id"], row["train_trusted"]) == (own_id, key_id(OTHER), 0)


def test_bad_feedback_is_a_400_naming_the_field(settings: Settings) -> None:
    with UvicornThread(operator_app(settings)) as server:
        _, request_id, _ = _ask(server.url, TRUSTED, TEACHER_UTTERANCE)
        cases: list[tuple[Any, str | None]] = [
            ({"request_id": request_id, "rating": "meh"}, "rating"),
            ({"request_id": request_id, "score": 1.5}, "score"),
            ({"request_id": request_id, "score": True}, "score"),
            (b'{"request_id": "%s", "score": NaN}' % request_id.encode(), "score"),
            ({"request_id": request_id, "correction": "   "}, "correction"),
            ({"request_id": request_id, "rating": "up", "ratng": "up"}, "ratng"),
            ({"rating": "up"}, "request_id"),
            ({"request_id": request_id, "comment": "nothing else"}, None),
            (b"[1]", None),
            (b"{not json", None),
        ]
        responses = [(_feedback(server.url, TRUSTED, body), param) for body, param in cases]
    for response, param in responses:
        assert response.status_code == 400, response.text
        error = _openai_error(response)
        assert error.body["param"] == param, response.text  # type: ignore[index]
        assert error.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert "rating, score or correction" in responses[7][0].json()["error"]["message"]
    assert _rows(settings, "feedback") == []


def test_an_open_gateway_takes_feedback_on_any_request(make_settings: Callable[..., Settings],
                                                       replay_teacher: str) -> None:
    settings = make_settings(replay_teacher, route=STUDENT_SETTINGS)
    with UvicornThread(operator_app(settings)) as server:
        completion_id, request_id, _ = _ask(server.url, "unused", STUDENT_UTTERANCE)
        response = _feedback(server.url, None, {"request_id": completion_id, "correction": "timer"})
    assert response.status_code == 200, response.text
    [row] = _rows(settings, "feedback")
    assert (row["request_id"], row["client_key_id"], row["train_trusted"]) == (request_id, None, 1)


def test_feedback_rows_are_purged_with_the_request_log(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "db.sqlite")
    try:
        for index, created_at in enumerate((1_000.0, 2_000_000_000.0)):
            store.insert_feedback({"request_id": f"r{index}", "route": ROUTE, "target": "student", "rating": "down",
                                   "correction": "personal text", "train_trusted": 1, "created_at": created_at})
        assert store.count_before(1_500.0)["feedback"] == 1
        assert store.purge_before(1_500.0)["feedback"] == 1
        assert [row["request_id"] for row in store.query("select request_id from feedback")] == ["r1"]
    finally:
        store.close()
