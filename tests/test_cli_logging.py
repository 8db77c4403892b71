"""The CLI's log keeps the gateway's own lines: libraries' per-call chatter is held back."""

from __future__ import annotations

import logging
import time

import pytest
from apscheduler.schedulers.background import BackgroundScheduler

from cli.main import NOISY_LOGGERS, quiet_libraries


@pytest.fixture
def restore_levels() -> object:
    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_scheduler_job_runs_stay_out_of_the_log_but_its_failures_do_not(
        caplog: pytest.LogCaptureFixture, restore_levels: object) -> None:
    quiet_libraries()
    scheduler = BackgroundScheduler()
    scheduler.add_job(lambda: None, "interval", seconds=0.05, id="quiet")
    scheduler.add_job(lambda: 1 / 0, "interval", seconds=0.05, id="broken")
    with caplog.at_level(logging.INFO):
        scheduler.start()
        time.sleep(0.4)
        scheduler.shutdown()
    executor_lines = [record for record in caplog.records if record.name == "apscheduler.executors.default"]
    assert executor_lines, "a failing job is still logged"
    assert all(record.levelno >= logging.WARNING for record in executor_lines)
    assert not any("quiet" in record.getMessage() for record in executor_lines)
