"""``POST /v1/feedback`` through real processes: ``distillgate serve`` with client keys and its
replay teacher child, the official SDK for the answer, httpx for the feedback, and the
trainer's dataset read from the SQLite file the gateway wrote."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from core.config import load_settings
from core.store import SQLiteStore
from harness.children import Child, python_module
from tests.helpers import free_port, sdk
from tests.operators import scrape, total, wait_for
from trainer.dataset import build_dataset

pytestmark = pytest.mark.integration
ROUTE = "clinc-intents"
TRUSTED, OTHER = "fb-trusted-7c1d", "fb-other-93ae"
UTTERANCE = "does ireland have any travel alerts i should be aware of"  # the teacher says travel_alert


def _config(tmp_path: Path) -> Path:
    teacher_port = free_port()
    config = {
        "store": {"path": str(tmp_path / "var" / "log.db")},
        "vllm": {"url": f"http://127.0.0.1:{free_port()}", "launch": False},
        # minilm needs no build step (static would be built on first start) and, with no
        # student, is never loaded.
        "router": {"embedder": "minilm"},
        "replay_teacher": {"launch": True, "port": teacher_port},
        "auth": {"keys": [{"key_env": "FB_TRUSTED_KEY", "trusted_for_training": True}, {"key_env": "FB_OTHER_KEY"}]},
        "routes": [{"name": ROUTE, "mode": "teacher_only",
                    "teacher": {"model": "openai/replay-teacher", "api_base": f"http://127.0.0.1:{teacher_port}/v1"}}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _post(url: str, key: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/v1/feedback", json=body, headers={"authorization": f"Bearer {key}"}, timeout=30)


def _rows(db: Path, sql: str, *params: Any) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(db)) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute(sql, params)]


def test_feedback_through_serve_and_the_replay_teacher(tmp_path: Path) -> None:
    config = _config(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = python_module("cli.main", "serve", "--config", str(config), "--port", str(port),
                         "--log-dir", str(tmp_path / "logs"))
    env = {"FB_TRUSTED_KEY": TRUSTED, "FB_OTHER_KEY": OTHER}
    with Child(args, f"{url}/healthz", tmp_path / "gateway.log", env=env, scrub_prefixes=("DISTILLGATE_",)):
        reply = sdk(url, TRUSTED).chat.completions.create(model=ROUTE, messages=[{"role": "user", "content": UTTERANCE}])
        assert reply.choices[0].message.content == "travel_alert"
        stolen = _post(url, OTHER, {"request_id": reply.id, "rating": "down", "correction": "oos"})
        given = _post(url, TRUSTED, {"request_id": reply.id, "rating": "down", "correction": "travel_notification",
                                     "comment": "a notice of my trip, not an alert"})
        missing = _post(url, TRUSTED, {"request_id": "chatcmpl-" + "f" * 32, "rating": "up"})
        samples = scrape(url)
        request_id = reply.id.removeprefix("chatcmpl-")
        settings = load_settings(config)
        db = Path(settings.store.path)
        wait_for(lambda: _rows(db, "select id from requests where id = ?", request_id), timeout_s=30)
    assert stolen.status_code == 404 and stolen.json()["error"]["param"] == "request_id"
    assert missing.status_code == 404
    assert given.status_code == 200, given.text
    assert given.json()["request_id"] == request_id
    assert total(samples, "distillgate_feedback_total", route=ROUTE, target="teacher", rating="down") == 1
    assert total(samples, "distillgate_feedback_total") == 1

    [row] = _rows(db, "select * from feedback")
    assert (row["request_id"], row["target"], row["train_trusted"]) == (request_id, "teacher", 1)
    assert row["comment"] == "a notice of my trip, not an alert"
    store = SQLiteStore(settings.store.path)
    try:
        dataset = build_dataset(store, settings.routes[0])
    finally:
        store.close()
    [example] = dataset.train + dataset.holdout
    assert (example.prompt_text, example.answer, example.corrected) == (UTTERANCE, "travel_notification", True)
