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


def test_a_tick_skipped_while_the_cycle_runs_is_not_a_warning_but_a_missed_run_is(
        caplog: pytest.LogCaptureFixture, restore_levels: object) -> None:
    quiet_libraries()
    quiet_libraries()  # idempotent: one filter, however often the CLI sets up
    scheduler_log = logging.getLogger("apscheduler.scheduler")
    assert sum(type(existing).__name__ == "ExpectedSchedulerSkips" for existing in scheduler_log.filters) == 1
    scheduler = BackgroundScheduler()
    # A job that outlives its interval: apscheduler skips the ticks that fire meanwhile.
    scheduler.add_job(lambda: time.sleep(0.5), "interval", seconds=0.1, id="long", max_instances=1)
    with caplog.at_level(logging.INFO):
        scheduler.start()
        time.sleep(0.8)
        scheduler.shutdown()
        scheduler_log.warning('Run time of job "x" was missed by 0:00:03')
    messages = [record.getMessage() for record in caplog.records if record.name == "apscheduler.scheduler"]
    assert not any("maximum number of running instances" in message for message in messages)
    assert any("was missed by" in message for message in messages)
