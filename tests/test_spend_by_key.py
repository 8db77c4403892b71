"""Spend by client key: the reporting SQL on a real SQLite file, ``report --by key``, the
budget config's validation, and the in-memory month ledger that budgets are checked against."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli.main import main
from core.config import ConfigError, Settings, parse_settings
from core.store import SQLiteStore, reporting
from gateway.auth import key_id
from gateway.budgets import KeyBudgets, next_month_start
from gateway.chat.record import RequestRecord

ROUTE = {"name": "r1", "teacher": {"model": "openai/gpt-4.1-mini"}}
APP_KEY = "sk-app-5e1d0b7a-secret"
BATCH_KEY = "sk-batch-93c4e2f1-secret"
# Mid-month, so "last month" and "this month" are both a few days away.
NOW = dt.datetime(2026, 11, 15, 12, tzinfo=dt.UTC).timestamp()
LAST_MONTH = dt.datetime(2026, 10, 31, 23, 59, tzinfo=dt.UTC).timestamp()


def _request(index: int, key: str | None, *, target: str, cost: float, teacher_cost: float,
             created_at: float = NOW - 60, route: str = "clinc-intents") -> dict[str, Any]:
    return {"id": f"r{index}", "created_at": created_at, "route": route, "target": target, "status_code": 200,
            "cost_usd": cost, "teacher_cost_usd": teacher_cost, "request_json": "{}",
            "client_key_id": key_id(key) if key else None}


def _fill(path: Path) -> None:
    """APP_KEY: 3 student + 1 teacher request this month; BATCH_KEY: 2 teacher requests, one
    of them last month; 2 anonymous requests."""
    store = SQLiteStore(path)
    rows = [_request(i, APP_KEY, target="student", cost=0.001, teacher_cost=0.01) for i in range(3)]
    rows.append(_request(3, APP_KEY, target="teacher", cost=0.01, teacher_cost=0.01, route="other"))
    rows.append(_request(4, BATCH_KEY, target="teacher", cost=0.5, teacher_cost=0.5))
    rows.append(_request(5, BATCH_KEY, target="teacher", cost=2.0, teacher_cost=2.0, created_at=LAST_MONTH))
    rows += [_request(6 + i, None, target="teacher", cost=0.02, teacher_cost=0.02) for i in range(2)]
    store.insert_requests(rows)
    store.close()


def test_key_summaries_group_cost_and_savings_by_key(tmp_path: Path) -> None:
    _fill(tmp_path / "log.db")
    store = SQLiteStore(tmp_path / "log.db")
    store.insert_requests([_request(9, APP_KEY, target="teacher", cost=0.0, teacher_cost=0.0,
                                    created_at=time.time() - 30)])
    summaries = {summary.client_key_id: summary for summary in reporting.key_summaries(store)}
    window = {summary.client_key_id: summary for summary in reporting.key_summaries(store, since_s=3600)}
    store.close()
    app, batch, anonymous = summaries[key_id(APP_KEY)], summaries[key_id(BATCH_KEY)], summaries[None]
    assert (app.requests, app.student_requests, app.student_share) == (5, 3, 0.6)
    assert app.cost_usd == pytest.approx(0.013) and app.teacher_cost_usd == pytest.approx(0.04)
    assert app.savings_usd == pytest.approx(0.027)
    assert (batch.requests, batch.cost_usd) == (2, pytest.approx(2.5))
    assert (anonymous.requests, anonymous.label, anonymous.cost_usd) == (2, reporting.NO_KEY, pytest.approx(0.04))
    assert next(iter(summaries)) == key_id(BATCH_KEY)  # the costliest first
    assert [(key, summary.requests) for key, summary in window.items()] == [(key_id(APP_KEY), 1)]


def test_month_spend_counts_this_utc_month_only(tmp_path: Path) -> None:
    _fill(tmp_path / "log.db")
    store = SQLiteStore(tmp_path / "log.db")
    spend = reporting.month_spend_by_key(store, now=NOW)
    store.close()
    assert spend == {key_id(APP_KEY): pytest.approx(0.013), key_id(BATCH_KEY): pytest.approx(0.5)}
    assert reporting.month_start_utc(NOW) == dt.datetime(2026, 11, 1, tzinfo=dt.UTC).timestamp()
    december = dt.datetime(2026, 12, 1, tzinfo=dt.UTC).timestamp()
    assert next_month_start(reporting.month_start_utc(NOW)) == december
    assert next_month_start(december) == dt.datetime(2027, 1, 1, tzinfo=dt.UTC).timestamp()


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ({"key_env": "K", "over_budget": "student_only"}, "over_budget is set but monthly_budget_usd is not"),
        ({"key_env": "K", "monthly_budget_usd": 0}, "auth.keys.0.monthly_budget_usd: Input should be greater than 0"),
        ({"key_env": "K", "monthly_budget_usd": 5, "over_budget": "teacher"}, "auth.keys.0.over_budget: Input should be"),
        ({"key_env": "K", "monthly_budget_usd": 5, "overbudget": "refuse"}, "auth.keys.0.overbudget: unknown key"),
    ],
)
def test_budget_config_names_the_problem(key: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_settings({"auth": {"keys": [key]}, "routes": [ROUTE]})
    assert message in str(error.value)


def test_one_policy_per_key() -> None:
    keys = [{"key_env": "K", "monthly_budget_usd": 5}, {"key_env": "K", "monthly_budget_usd": 50}]
    with pytest.raises(ConfigError, match="names a key_env more than once: K"):
        parse_settings({"auth": {"keys": keys}, "routes": [ROUTE]})


def test_budget_defaults_to_refuse() -> None:
    settings = parse_settings({"auth": {"keys": [{"key_env": "K", "monthly_budget_usd": 5}]}, "routes": [ROUTE]})
    assert settings.auth.keys[0].over_budget_action == "refuse"


def _record(key: str, cost: float, created_at: float) -> RequestRecord:
    record = RequestRecord(route="r1", request={}, stream=False, client_key_id=key_id(key), created_at=created_at)
    record.cost_usd = cost
    return record


def test_ledger_is_seeded_once_then_counts_requests_and_restarts_each_month(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_KEY", APP_KEY)
    monkeypatch.setenv("BATCH_KEY", BATCH_KEY)
    settings = parse_settings({"auth": {"keys": [
        {"key_env": "APP_KEY", "monthly_budget_usd": 0.02, "over_budget": "student_only"},
        {"key_env": "BATCH_KEY", "monthly_budget_usd": 1.0}]}, "routes": [ROUTE]})
    _fill(tmp_path / "log.db")
    store = SQLiteStore(tmp_path / "log.db")
    queries: list[str] = []
    original = store.query
    monkeypatch.setattr(store, "query", lambda sql, params=(): queries.append(sql) or original(sql, params))
    clock = {"now": NOW}
    budgets = KeyBudgets(settings.auth, clock=lambda: clock["now"])
    budgets.seed(store)
    assert len(queries) == 1  # one query at startup, none per check below
    app, batch = key_id(APP_KEY), key_id(BATCH_KEY)
    assert budgets.spent(app) == pytest.approx(0.013) and budgets.spent(batch) == pytest.approx(0.5)
    assert budgets.over_budget(app) is None and budgets.over_budget(batch) is None
    budgets.observe(_record(APP_KEY, 0.007, NOW))
    assert budgets.over_budget(app) == "student_only"  # 0.020 spent of 0.02
    budgets.observe(_record(BATCH_KEY, 0.6, NOW))
    assert budgets.over_budget(batch) == "refuse"
    assert budgets.over_budget(None) is None and budgets.over_budget(key_id("sk-unbudgeted")) is None
    error = budgets.exceeded(batch)
    assert (error.status_code, error.code, error.error_type) == (429, "budget_exceeded", "insufficient_quota")
    assert "monthly budget of $1.00" in error.message and "2026-12-01 00:00 UTC" in error.message
    assert error.headers["x-should-retry"] == "false"
    assert int(error.headers["retry-after"]) == pytest.approx(next_month_start(reporting.month_start_utc(NOW)) - NOW, abs=1)
    clock["now"] = dt.datetime(2026, 12, 1, 0, 0, 1, tzinfo=dt.UTC).timestamp()
    budgets.observe(_record(APP_KEY, 5.0, NOW))  # begun in November: November's
    assert budgets.spent(app) == 0.0 and budgets.over_budget(batch) is None
    assert len(queries) == 1
    store.close()


def _config_file(settings: Settings, tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_none=True)))
    return path


def test_report_by_key_names_keys_and_shows_budgets(make_settings: Callable[..., Settings], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("APP_KEY", APP_KEY)
    settings = make_settings("http://127.0.0.1:9", auth={"keys": [
        {"key_env": "APP_KEY", "monthly_budget_usd": 25.0}, {"key_env": "UNUSED_KEY"}]})
    _fill(settings.store.path)
    config = _config_file(settings, tmp_path)
    assert main(["report", "--config", str(config), "--by", "key", "--since", "all", "--json"]) == 0
    printed = capsys.readouterr().out
    keys = {entry["label"]: entry for entry in json.loads(printed)["keys"]}
    app = keys[f"APP_KEY ({key_id(APP_KEY)})"]
    assert (app["name"], app["requests"], app["monthly_budget_usd"]) == ("APP_KEY", 4, 25.0)
    assert app["savings_usd"] == pytest.approx(0.027)
    # The rows are from November 2026: this month's spend is whatever falls in the real month.
    assert app["month_spend_usd"] == pytest.approx(0.013 if reporting.month_start_utc() <= NOW else 0.0)
    assert keys[key_id(BATCH_KEY)]["name"] is None  # no policy here: known by its hash only
    assert keys[reporting.NO_KEY]["requests"] == 2
    assert main(["report", "--config", str(config), "--by", "key", "--since", "all"]) == 0
    table = capsys.readouterr().out
    for text in ("APP_KEY", key_id(BATCH_KEY), "(no key)", "$0.027000", "$25.00", "75.0%"):
        assert text in table, text
    for secret in (APP_KEY, BATCH_KEY):
        assert secret not in printed and secret not in table
