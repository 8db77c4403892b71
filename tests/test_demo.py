"""`distillgate demo`: the loop closes (a version is promoted and the student serves), the
report is honest (no goal met over failed requests or an undefined figure; savings net of
training with a break-even), and the demo does not depend on the caller's environment.

Fast tier: the report logic on built outcomes. Integration tier: the demo's gateway started
by the demo's own code with a hostile shell environment, and `distillgate demo --quick` end to
end (real gateway, vLLM, replay teacher, trainer) run with that environment too.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from core.config import CostsConfig
from harness.demo import report
from harness.demo.goals import MET, NOT_MET, UNDEFINED, full_goals, goals, quick_goals
from harness.demo.options import DemoOptions
from harness.demo.savings import TrainingCharge, break_even, timeline
from harness.demo.stack import (
    EVALUATION_KEY_ENV,
    Credentials,
    demo_config,
    gateway_environment,
    start_stack,
)
from harness.demo.traffic import Outcome, Query
from tests.helpers import log_rows

ROOT = Path(__file__).resolve().parents[1]
# What a user running the gateway has in their shell; the demo must work regardless.
HOSTILE_ENV = {"DISTILLGATE_API_KEYS": "the-users-own-key", "DISTILLGATE_ADMIN_TOKEN": "the-users-admin-token",
               "DISTILLGATE_METRICS_TOKEN": "the-users-metrics-token"}


# -- fast tier: the report's logic -------------------------------------------------------------
def _outcome(index: int, *, label: str = "balance", target: str | None = "teacher", answer: str | None = None,
             error: str | None = None, sent_at: float | None = None) -> Outcome:
    return Outcome(index, Query(f"utterance {index}", label), None if error else (answer or label),
                   None if error else target, None, None if error else f"r{index}", 100.0, error=error,
                   sent_at=float(index) if sent_at is None else sent_at)


def _result(outcomes: list[Outcome], references: list[report.Reference], costs: dict[str, float],
            heldout: list[Outcome], loop: dict[str, Any]) -> dict[str, Any]:
    """A result shaped as the runner assembles it, from the same report functions."""
    overall = report.summarize(outcomes, references, costs)
    return {"overall": overall, "phases": report.phases(outcomes, references, costs, 500),
            "last_window": report.summarize(outcomes[-2000:], references[-2000:], costs),
            "heldout": report.heldout_section(heldout, references[:len(heldout)], costs), "loop": loop}


def test_a_run_whose_requests_all_failed_meets_no_goal() -> None:
    """The issue's case: 2,000 requests rejected with 401 once read "cost <= 0.35: met"."""
    failed = [_outcome(i, error="AuthenticationError: 401") for i in range(2000)]
    references = [report.Reference("balance", 0.001)] * 2000
    result = _result(failed, references, {}, failed[:600], {"first_promotion_request": None,
                                                             "promotions_during_stream": 0})
    assert result["overall"]["cost_usd"] == 0 and result["overall"]["cost_vs_all_teacher"] is None
    for quick in (False, True):
        verdicts = goals(result, quick)
        assert not any(goal["met"] for goal in verdicts.values()), verdicts
        assert verdicts["zero failed requests"]["status"] == NOT_MET
        assert verdicts["zero failed requests"]["figure"] == 2600
    full = goals(result, quick=False)
    assert full["cost <= 35% of all-teacher (whole stream, shadow calls included)"]["status"] == UNDEFINED
    assert full["first promotion within the first 3,000 requests"]["status"] == NOT_MET


def _good_run(failed_at: Collection[int] = ()) -> dict[str, Any]:
    """A stream where the student serves 80% of in-scope traffic at teacher quality; the
    requests at ``failed_at`` failed."""
    outcomes, references, costs = [], [], {}
    for i in range(3000):
        label = "oos" if i % 10 == 0 else "balance"
        target = "teacher" if label == "oos" or i % 5 == 1 else "student"
        outcome = _outcome(i, label=label, target=target, error="APIConnectionError" if i in failed_at else None)
        outcomes.append(outcome)
        references.append(report.Reference(label, 0.001))
        costs[f"r{i}"] = 0.001 if target == "teacher" else 0.00001
    return _result(outcomes, references, costs, outcomes[:600],
                   {"first_promotion_request": 900, "promotions_during_stream": 2})


def test_goals_are_met_when_the_figures_reach_their_targets_and_nothing_failed() -> None:
    result = _good_run()
    for verdicts in (full_goals(result), quick_goals(result)):
        assert {name: goal.status for name, goal in verdicts.items()} == dict.fromkeys(verdicts, MET)
    assert full_goals(result)["held-out in-scope accuracy within 1.5 points of all-teacher"].figure == 0


def test_a_figure_that_reaches_its_target_is_undefined_when_requests_failed() -> None:
    result = _good_run(failed_at={7, 8})
    verdicts = full_goals(result)
    cost = verdicts["cost <= 35% of all-teacher (whole stream, shadow calls included)"]
    assert cost.figure is not None and cost.figure <= 0.35
    assert cost.status == UNDEFINED and "requests failed" in (cost.note or "")
    assert verdicts["zero failed requests"].status == NOT_MET
    assert not any(goal.status == MET for goal in verdicts.values())


def test_a_missing_figure_is_undefined_and_a_missed_one_not_met() -> None:
    result = _good_run()
    result["heldout"]["in_scope_accuracy"] = None
    result["phases"][-1]["in_scope_student_share"] = 0.29
    verdicts = quick_goals(result)
    assert verdicts["held-out in-scope accuracy within 2 points of all-teacher"].status == UNDEFINED
    assert verdicts["student serves >= 30% of in-scope traffic in the last phase"].status == NOT_MET


def test_net_savings_count_training_and_mark_the_break_even_request() -> None:
    """100 requests, one a second; the teacher serves the first 50 ($1 each), the student the
    rest ($0.01); a $10 training run between t=20 and t=30 and a $1 shadow call at t=55.
    Net savings reach -$11, then gain $0.99 a request from request 51: above zero from
    request 62 on."""
    outcomes = [_outcome(i, target="teacher" if i < 50 else "student") for i in range(100)]
    references = [report.Reference("balance", 1.0)] * 100
    costs = {f"r{i}": 1.0 if i < 50 else 0.01 for i in range(100)}
    charge = TrainingCharge("v1", "candidate", "cpu", 20.0, 30.0, 10.0)
    figures = timeline(outcomes, references, costs, [(55.0, 1.0), (500.0, 9.0)], [charge], until=100.0)
    # The shadow call after the stream (t=500) belongs to the held-out evaluation.
    assert figures["training_cost_usd"] == 10.0 and figures["shadow_cost_usd"] == 1.0
    assert figures["net_savings_usd"] == pytest.approx(100 - (50 + 0.5) - 1.0 - 10)
    assert figures["break_even_request"] == 62
    assert figures["series"]["net_savings_usd"][25] == pytest.approx(-5.0)  # request 26 (t=25): half the run
    assert break_even([0.0, -1.0, 1.0, -0.5, 2.0], first_charge=1) == 5
    assert break_even([0.0, -1.0, -0.5], first_charge=1) is None
    assert break_even([0.1, 0.2], first_charge=None) is None


def test_training_is_priced_by_device() -> None:
    costs = CostsConfig(training_per_cpu_hour=0.2, training_per_gpu_hour=4.0)
    assert costs.training_cost(1800, "cpu") == pytest.approx(0.1)
    assert costs.training_cost(900, "cuda:0") == pytest.approx(1.0)


def test_held_out_queries_have_a_key_of_their_own_that_is_not_trusted_for_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.config import parse_settings
    from gateway.auth import key_id
    from gateway.keys import KeyPolicies

    options = DemoOptions.quick_defaults(out=tmp_path)
    settings = parse_settings(demo_config(options, 8000, 8200, 8100), options.config)
    credentials = Credentials.generate()
    environment = gateway_environment(settings, credentials)
    assert environment[EVALUATION_KEY_ENV] == credentials.evaluation_key != credentials.client_key
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    policies = KeyPolicies(settings.auth)
    assert policies.trusted_for_training(key_id(credentials.client_key))
    assert not policies.trusted_for_training(key_id(credentials.evaluation_key))


def test_the_demo_keeps_its_versions_in_its_own_folder(tmp_path: Path) -> None:
    """Not the checkout's var/adapters, where its v1, v2... would replace a gateway's own."""
    from core.config import parse_settings

    options = DemoOptions.quick_defaults(out=tmp_path)
    settings = parse_settings(demo_config(options, 8000, 8200, 8100), options.config)
    assert settings.store.adapters_dir == tmp_path / "adapters"
    assert parse_settings(yaml.safe_load(options.config.read_text())).store.adapters_dir == Path("var/adapters")


# -- integration tier: the demo's own gateway, with the caller's shell set -----------------------
@pytest.mark.integration
def test_the_demo_gateway_uses_its_own_keys_whatever_the_callers_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in HOSTILE_ENV.items():
        monkeypatch.setenv(name, value)
    stack = start_stack(DemoOptions.quick_defaults(out=tmp_path), launch_vllm=False, gateway_timeout_s=120)
    try:
        own = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key=stack.credentials.client_key, max_retries=0)
        reply = own.chat.completions.create(model=stack.settings.routes[0].name,
                                            messages=[{"role": "user", "content": "what is my bank balance"}])
        assert reply.choices[0].message.content
        users = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key=HOSTILE_ENV["DISTILLGATE_API_KEYS"],
                              max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            users.models.list()
        admin = f"{stack.gateway_url}/admin/routes"
        assert httpx.get(admin, headers={"Authorization": f"Bearer {stack.credentials.admin_token}"}).status_code == 200
        users_admin = {"Authorization": f"Bearer {HOSTILE_ENV['DISTILLGATE_ADMIN_TOKEN']}"}
        assert httpx.get(admin, headers=users_admin).status_code == 401
        # The caller's metrics token did not reach the demo's gateway either.
        assert httpx.get(f"{stack.gateway_url}/metrics").status_code == 200
        # The held-out queries' key answers too, but nothing it sends becomes training data.
        evaluation = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key=stack.credentials.evaluation_key,
                                   max_retries=0)
        assert evaluation.chat.completions.create(
            model=stack.settings.routes[0].name,
            messages=[{"role": "user", "content": "how do i transfer money"}]).choices[0].message.content
        # Read while the gateway runs: its writer logs in batches (a loaded machine may stop it
        # only after its grace period, with the batch still spooled).
        rows = log_rows(stack.settings, 2, timeout_s=30)
    finally:
        stack.stop()
    trusted = {json.loads(row["request_json"])["messages"][0]["content"]: row["train_trusted"] for row in rows}
    assert trusted == {"what is my bank balance": 1, "how do i transfer money": 0}


# -- integration tier: `distillgate demo --quick` end to end -------------------------------------
@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "PYTHONPATH": str(ROOT), **HOSTILE_ENV}
    completed = subprocess.run([sys.executable, "-m", "cli.main", "demo", "--quick", "--out", str(out)],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert completed.returncode == 0, (completed.stdout[-3000:], completed.stderr[-3000:])
    yield out


def _report(demo_out: Path) -> dict[str, Any]:
    return json.loads((demo_out / "report.json").read_text())


@pytest.mark.integration
@pytest.mark.timeout(1800)
def test_quick_demo_promoted_a_version_and_the_student_served_traffic(demo_out: Path) -> None:
    report_ = _report(demo_out)
    loop, overall, last_phase = report_["loop"], report_["overall"], report_["phases"][-1]
    assert loop["promotions_during_stream"] >= 1, report_["versions"]
    assert loop["first_promotion_request"] is not None and loop["first_promotion_request"] < overall["requests"]
    assert any(version["promoted_at"] for version in report_["versions"])
    assert overall["student_share"] > 0 and last_phase["in_scope_student_share"] > 0
    with sqlite3.connect(demo_out / "distillgate.db") as connection:
        served = connection.execute("select count(*) from requests where target = 'student' and status_code = 200 "
                                    "and student_version is not null").fetchone()[0]
    assert served > 0
    with sqlite3.connect(demo_out / "distillgate.db") as connection:
        adapters = [Path(row[0]) for row in connection.execute("select adapter_path from student_versions")]
    assert adapters and all(path.is_relative_to(demo_out / "adapters") for path in adapters), adapters


@pytest.mark.integration
@pytest.mark.timeout(1800)
def test_report_counts_add_up(demo_out: Path) -> None:
    report_ = _report(demo_out)
    overall, phases, savings = report_["overall"], report_["phases"], report_["savings"]
    assert overall["requests"] == report_["options"]["requests"]
    assert overall["failed_requests"] == 0 and report_["heldout"]["failed_requests"] == 0
    assert sum(phase["requests"] for phase in phases) == overall["requests"]
    assert sum(phase["cost_usd"] for phase in phases) == pytest.approx(overall["cost_usd"], rel=1e-6, abs=1e-9)
    assert sum(phase["all_teacher_cost_usd"] for phase in phases) == pytest.approx(overall["all_teacher_cost_usd"])
    assert 0 < overall["cost_usd"] <= overall["cost_usd_with_shadow"]
    for share in ("student_share", "accuracy", "all_teacher_accuracy", "oos_sent_to_teacher"):
        assert 0 <= overall[share] <= 1
    assert report_["heldout"]["queries"] == report_["options"]["heldout_limit"]
    assert all(goal["status"] in {MET, NOT_MET, UNDEFINED} and goal["met"] == (goal["status"] == MET)
               for goal in report_["goals"].values())
    # Net savings: what the run saved after its training runs, which the store recorded.
    assert savings["training"]["runs"] and savings["training_cost_usd"] > 0
    assert savings["training_cost_usd"] == pytest.approx(savings["training"]["cost_usd"], abs=1e-6)
    assert savings["actual_cost_usd"] + savings["shadow_cost_usd"] == pytest.approx(overall["cost_usd_with_shadow"])
    assert savings["net_savings_usd"] == pytest.approx(
        savings["all_teacher_cost_usd"] - overall["cost_usd_with_shadow"] - savings["training_cost_usd"], abs=1e-5)
    assert savings["series"]["net_savings_usd"][-1] == pytest.approx(savings["net_savings_usd"], abs=1e-6)
    assert (demo_out / "savings.png").stat().st_size > 10_000
    assert all(version["status"] in {"candidate", "live", "retired", "rejected", "failed"}
               for version in report_["versions"])


@pytest.mark.integration
@pytest.mark.timeout(1800)
def test_student_requests_cost_less_than_teacher_requests(demo_out: Path) -> None:
    with sqlite3.connect(demo_out / "distillgate.db") as connection:
        averages = dict(connection.execute(
            "select target, avg(cost_usd) from requests where status_code = 200 group by target"))
        rows = connection.execute("select count(*) from requests").fetchone()[0]
    report_ = _report(demo_out)
    assert rows == report_["overall"]["requests"] + report_["heldout"]["queries"]
    assert averages["teacher"] > 0 and "student" in averages
    assert averages["student"] < averages["teacher"]


async def test_paced_traffic_keeps_query_order_and_reports_each_outcome() -> None:
    """Both demo streams (the main route's and the tool route's) send through ``paced``: with
    several workers the answers finish out of order, and the results still come back in order."""
    import asyncio

    from harness.demo.traffic import paced

    queries = [Query(f"utterance {index}", "balance") for index in range(12)]
    seen: list[int] = []

    async def send(index: int, query: Query) -> tuple[int, str]:
        await asyncio.sleep(0.001 * (12 - index))  # later queries answer sooner
        return index, query.text

    results = await paced(queries, send, concurrency=4, rate_per_s=None, on_outcome=lambda r: seen.append(r[0]))
    assert results == [(index, f"utterance {index}") for index in range(12)]
    assert sorted(seen) == list(range(12)) and seen != list(range(12))
