"""``distillgate report``: CLI smoke on an empty and a filled store; the numbers add up."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli.main import main
from core.config import Settings
from core.store import SQLiteStore, reporting
from core.store.score_rollups import SCORE_EDGES, snap
from router import calibration

ROUTE = "clinc-intents"


def _config_file(settings: Settings, tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_none=True)))
    return path


def _request(index: int, *, target: str, latency_ms: float, cost: float, teacher_cost: float,
             age_s: float = 60.0, status: int = 200, route: str = ROUTE) -> dict[str, Any]:
    return {"id": f"r{index}", "created_at": time.time() - age_s, "route": route, "target": target,
            "status_code": status, "fallback": 0, "stream": 0, "prompt_tokens": 10, "completion_tokens": 2,
            "latency_ms": latency_ms, "cost_usd": cost, "teacher_cost_usd": teacher_cost, "request_json": "{}"}


@pytest.fixture
def filled(make_settings: Callable[..., Settings], tmp_path: Path) -> Path:
    """100 requests in the last day (60 student at 1..60 ms, 40 teacher at 101..140 ms), one
    request 3 days old, 10 shadow comparisons of student-served answers (7 agree) and 5 of
    teacher-served ones (1 agrees), a live version."""
    settings = make_settings("http://127.0.0.1:9")
    store = SQLiteStore(settings.store.path)
    rows = [_request(i, target="student", latency_ms=i + 1, cost=0.0001, teacher_cost=0.001) for i in range(60)]
    rows += [_request(60 + i, target="teacher", latency_ms=101 + i, cost=0.001, teacher_cost=0.001) for i in range(40)]
    rows.append(_request(100, target="teacher", latency_ms=5000, cost=1.0, teacher_cost=1.0, age_s=3 * 86400))
    store.insert_requests(rows)
    store.insert_shadow_results([{"request_id": f"r{i}", "created_at": time.time() - 30, "route": ROUTE,
                                  "student_version": "v1", "router_score": 0.1 * i, "agree": int(i < 7),
                                  "served_by": "student"} for i in range(10)])
    store.insert_shadow_results([{"request_id": f"r{60 + i}", "created_at": time.time() - 30, "route": ROUTE,
                                  "student_version": "v1", "router_score": 0.5, "agree": int(i == 0),
                                  "served_by": "teacher"} for i in range(5)])
    store.upsert_version({"route": ROUTE, "version": "v1", "status": "candidate", "created_at": time.time()})
    store.set_live_version(ROUTE, "v1")
    store.close()
    return _config_file(settings, tmp_path)


def test_report_json_numbers_add_up(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--config", str(filled), "--since", "24h", "--json"]) == 0
    [route] = json.loads(capsys.readouterr().out)["routes"]
    assert route["route"] == ROUTE and route["requests"] == 100
    assert route["student_requests"] == 60 and route["student_share"] == pytest.approx(0.6)
    assert route["cost_usd"] == pytest.approx(60 * 0.0001 + 40 * 0.001)
    assert route["teacher_cost_usd"] == pytest.approx(100 * 0.001)
    assert route["savings_usd"] == pytest.approx(route["teacher_cost_usd"] - route["cost_usd"])
    assert route["served_agreement"] == pytest.approx(0.7)  # what clients got from the student
    assert route["agreement"] == pytest.approx(8 / 15) and route["shadow_comparisons"] == 15
    # Nearest rank over 1..60, 101..140, read from the rollups' histograms: within their
    # stated bound, 2**(1/8) either way (core/store/rollup_reads.py percentile).
    for target, exact in (("student", {"p50": 30, "p99": 60}), ("teacher", {"p50": 120, "p99": 140}),
                          ("all", {"p50": 50, "p99": 139})):
        for name, value in exact.items():
            assert value / 2 ** (1 / 8) <= route["latency_ms"][target][name] <= value * 2 ** (1 / 8), (target, name)
    assert route["live_version"] == "v1"


def test_report_window_includes_older_rows(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--config", str(filled), "--since", "all", "--json"]) == 0
    [route] = json.loads(capsys.readouterr().out)["routes"]
    assert route["requests"] == 101 and route["cost_usd"] == pytest.approx(1.046)


def test_report_table(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--config", str(filled)]) == 0
    out = capsys.readouterr().out
    for text in (ROUTE, "100", "60.0%", "$0.046000", "$0.100000", "$0.054000", "70.0% / 53.3%", "v1"):
        assert text in out, text


def test_report_on_an_empty_store_creates_nothing(make_settings: Callable[..., Settings], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    settings = make_settings("http://127.0.0.1:9")
    config = _config_file(settings, tmp_path)
    assert main(["report", "--config", str(config), "--json"]) == 0
    [route] = json.loads(capsys.readouterr().out)["routes"]
    assert (route["requests"], route["savings_usd"], route["student_share"], route["live_version"]) == (0, 0, None, None)
    assert not Path(settings.store.path).exists()
    assert main(["report", "--config", str(config)]) == 0
    assert "none" in capsys.readouterr().out


def test_report_rejects_a_bad_window(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--config", str(filled), "--since", "soon"]) == 2
    assert "not a duration" in capsys.readouterr().err


def test_calibration_curve_sweeps_thresholds() -> None:
    points = calibration.calibration_curve([0.1, 0.2, 0.3, 0.9], [(0.1, 1), (0.2, 1), (0.3, 0), (0.9, 0)],
                                         [0.0, 0.2, 0.5, 1.0])
    assert [point.student_share for point in points] == [0.0, 0.5, 0.75, 1.0]
    assert [point.expected_agreement for point in points] == [None, 1.0, pytest.approx(2 / 3), 0.5]
    assert reporting.parse_since("90m") == 5400 and reporting.parse_since("all") is None


def test_route_calibration_uses_the_certified_router_calibration() -> None:
    store = SQLiteStore(":memory:")
    now = time.time()
    store.insert_requests([{**_request(i, target="student", latency_ms=1, cost=0, teacher_cost=0),
                            "router_score": i / 300} for i in range(300)])
    store.insert_shadow_results([{"request_id": f"r{i}", "created_at": now, "route": ROUTE, "router_score": i / 300,
                                  "agree": int(i < 200)} for i in range(300)])
    result = calibration.route_calibration(store, ROUTE, current=0.5, target_agreement=0.9)
    store.close()
    assert result["scored_requests"] == result["shadow_samples"] == 300
    assert result["recommended_threshold"] is not None and 0.3 < result["recommended_threshold"] < 0.9
    at_half = [point for point in result["points"] if point["threshold"] <= 0.5][-1]
    # Read from the score rollups: exact at the bucket edge at or under the threshold (score_rollups.snap).
    edge = SCORE_EDGES[snap(at_half["threshold"])]
    assert at_half["threshold"] / 2 ** (1 / 32) < edge <= at_half["threshold"]
    under = sum(1 for i in range(300) if i / 300 <= edge)
    assert at_half["student_share"] == pytest.approx(under / 300)
    assert at_half["expected_agreement"] == 1.0 and 0.9 < at_half["agreement_lcb"] < 1.0


def test_report_counts_training_compute_and_shadow_calls_in_net_savings(
        make_settings: Callable[..., Settings], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = make_settings("http://127.0.0.1:9", costs={"training_per_cpu_hour": 0.4, "training_per_gpu_hour": 6.0})
    store = SQLiteStore(settings.store.path)
    store.insert_requests([_request(i, target="student", latency_ms=5, cost=0.0001, teacher_cost=0.01)
                           for i in range(100)])
    store.insert_shadow_results([{"request_id": f"r{i}", "created_at": time.time() - 30, "route": ROUTE,
                                  "agree": 1, "cost_usd": 0.01} for i in range(5)])
    now = time.time()
    # 30 minutes on a CPU (rejected: it cost compute all the same), 10 minutes on a GPU.
    store.record_training_run({"route": ROUTE, "started_at": now - 3600, "finished_at": now - 1800,
                               "outcome": "rejected", "version": "v1", "detail_json": "{}"})
    store.record_training_run({"route": ROUTE, "started_at": now - 900, "finished_at": now - 300, "outcome": "candidate",
                               "version": "v2", "detail_json": json.dumps({"train": {"device": "cuda:0"}})})
    store.close()
    config = _config_file(settings, tmp_path)
    assert main(["report", "--config", str(config), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["training_prices"] == {"training_per_cpu_hour": 0.4, "training_per_gpu_hour": 6.0}
    [route] = printed["routes"]
    assert route["training_runs"] == 2 and route["training_hours"] == pytest.approx(0.5 + 1 / 6)
    assert route["training_cost_usd"] == pytest.approx(0.5 * 0.4 + 6.0 / 6)
    assert route["shadow_cost_usd"] == pytest.approx(0.05)
    assert route["savings_usd"] == pytest.approx(100 * (0.01 - 0.0001))
    assert route["net_savings_usd"] == pytest.approx(0.99 - 0.05 - 1.2)
    assert main(["report", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "net savings" in out and "$1.200000 (2)" in out and "-$0.260000" in out
