"""The request-log writer survives poison rows and its own crashes: a token count above
2^63 from an upstream (SQLite's OverflowError) goes to the dead-letter file, the log goes on,
and the writer's liveness shows in ``/readyz`` and ``/metrics``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from core.config import Settings
from core.store import BatchWriter, SQLiteStore
from core.store.spool import Spool
from gateway.app import create_app
from tests.helpers import MESSAGES, UvicornThread, log_rows, row, sdk
from tests.operators import scrape, total, wait_for

ROUTE = "clinc-intents"
HUGE = 2**64  # above SQLite's INTEGER range


def _student_app(usage: dict[str, int]) -> Starlette:
    """A vLLM stand-in on loopback whose usage counts are whatever the test says."""

    async def chat(request: Request) -> Response:
        return JSONResponse({"id": "cmpl-1", "object": "chat.completion", "created": int(time.time()), "model": "x",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "transfer"},
                                          "finish_reason": "stop"}],
                             "usage": usage})

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)])


def _dead_letters(settings: Settings) -> list[dict[str, Any]]:
    path = settings.store.dead_letter_file()
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_poison_row_is_dead_lettered_and_the_log_goes_on(make_settings: Callable[..., Settings],
                                                          replay_teacher: str) -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": HUGE}
    with UvicornThread(_student_app(usage)) as student:
        settings = make_settings(replay_teacher, student_url=student.url,
                                 route={"mode": "student_only", "student": {"serve_base_model": True}})
        with UvicornThread(create_app(settings)) as server:
            client = sdk(server.url)
            assert client.chat.completions.create(model=ROUTE, messages=MESSAGES).choices[0].message.content
            usage["completion_tokens"] = 1
            for _ in range(3):
                client.chat.completions.create(model=ROUTE, messages=MESSAGES)
            rows = log_rows(settings, 3)
            wait_for(lambda: len(_dead_letters(settings)) == 1, timeout_s=5)
            ready = httpx.get(f"{server.url}/readyz")
            samples = scrape(server.url)
    assert len(rows) == 3 and all(row["completion_tokens"] == 1 for row in rows)
    [poison] = _dead_letters(settings)
    assert poison["table"] == "requests" and "OverflowError" in poison["error"]
    assert poison["row"]["completion_tokens"] == HUGE and poison["row"]["route"] == ROUTE
    assert settings.store.dead_letter_file().stat().st_mode & 0o777 == 0o600
    store = ready.json()["checks"]["store"]
    assert ready.status_code == 200 and store["writer_alive"] is True and store["dead_letter_rows"] == 1
    assert total(samples, "distillgate_store_writer_alive", writer="requests") == 1
    assert total(samples, "distillgate_store_dead_letter_rows_total", writer="requests") == 1
    # The poison row left the spool with its batch: nothing is replayed (or crashes) at the next start.
    assert list(settings.store.spool_dir().glob("*.jsonl")) == []


def test_a_poison_row_left_in_the_spool_does_not_stop_the_next_start(make_settings: Callable[..., Settings],
                                                                    replay_teacher: str) -> None:
    settings = make_settings(replay_teacher)
    spool_dir = settings.store.spool_dir()
    spool_dir.mkdir(parents=True)
    poison = {**row(2), "completion_tokens": HUGE}
    (spool_dir / "000000000003.jsonl").write_text("\n".join(json.dumps(item) for item in (row(1), poison, row(3))))
    with UvicornThread(create_app(settings)) as server:
        assert sdk(server.url).chat.completions.create(model=ROUTE, messages=MESSAGES).choices[0].message.content
        rows = log_rows(settings, 3)
    assert {item["id"] for item in rows} >= {row(1)["id"], row(3)["id"]}
    assert [item["row"]["id"] for item in _dead_letters(settings)] == [poison["id"]]


async def test_the_writer_task_is_restarted_when_it_dies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    writer = BatchWriter(store.insert_requests, flush_interval_s=0.01, spool=Spool(tmp_path / "spool"))
    real_next_batch = writer._next_batch
    crashes = []

    async def crash_once() -> list[Any]:
        if not crashes:
            crashes.append(1)
            raise RuntimeError("a bug outside the write")
        return await real_next_batch()

    monkeypatch.setattr(writer, "_next_batch", crash_once)
    writer.start()
    await writer.log(row(1))
    await writer.log(row(2))
    await writer.close(timeout_s=10)
    assert writer.restarts == 1 and "a bug outside the write" in (writer.last_crash or "")
    assert store.count_requests() == 2


@pytest.mark.parametrize(("fsync", "synchronous"), [(True, 2), (False, 1)])
def test_spool_fsync_makes_store_commits_durable_before_the_spool_lets_go(
        make_settings: Callable[..., Settings], replay_teacher: str, fsync: bool, synchronous: int) -> None:
    """With ``spool.fsync`` the store commits with synchronous=FULL (2): a committed row is on
    disk before its spool line is truncated away. Without it, NORMAL (1) is enough."""
    settings = make_settings(replay_teacher, store={"spool": {"fsync": fsync}})
    app = create_app(settings)
    with UvicornThread(app) as server:
        sdk(server.url).chat.completions.create(model=ROUTE, messages=MESSAGES)
        log_rows(settings, 1)
        assert app.state.store.query("pragma synchronous")[0]["synchronous"] == synchronous
