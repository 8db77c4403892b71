"""A training run that crashes (killed mid-run, or exits non-zero) promotes nothing: the
scheduler reports ``train_failed`` and never calls the swapper; the live version stays.
(A corrupt or oversized adapter refused at promotion is covered in tests/test_swap.py.)"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core.config import Settings
from core.store import SQLiteStore
from gateway.training.schedule import TrainingScheduler


class RecordingSwapper:
    def __init__(self) -> None:
        self.promoted: list[tuple[str, str]] = []

    async def promote(self, route: str, version: str, **_: Any) -> Any:
        self.promoted.append((route, version))


class CrashingScheduler(TrainingScheduler):
    """Enough new examples, and a training child that dies as ``script`` says."""

    script = ""

    def new_examples(self, route: str) -> int:
        return 10**6

    def command(self, route: str) -> list[str]:
        return [sys.executable, "-c", self.script]


@pytest.mark.parametrize("script", [
    "import os, signal, sys; print('{\"status\": \"cand'); sys.stdout.flush(); os.kill(os.getpid(), signal.SIGKILL)",
    "import sys; sys.stderr.write('Traceback: CUDA out of memory'); sys.exit(1)",
])
async def test_crashed_training_promotes_nothing(make_settings: Callable[..., Settings], tmp_path: Path,
                                                 script: str) -> None:
    settings = make_settings("http://127.0.0.1:9")
    store = SQLiteStore(settings.store.path)
    store.upsert_version({"route": "clinc-intents", "version": "v1", "status": "live", "created_at": 1.0})
    swapper = RecordingSwapper()
    scheduler = CrashingScheduler(settings, store, swapper, config_path=tmp_path / "unused.yaml")  # type: ignore[arg-type]
    scheduler.script = script
    outcome = await scheduler._tick(settings.routes[0])
    assert outcome["action"] == "train_failed"
    assert swapper.promoted == []
    assert store.live_version("clinc-intents")["version"] == "v1"
