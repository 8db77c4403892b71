"""Smoke tests: ``distillgate train | versions | promote | rollback`` and ``bench/train.py --quick``."""

from __future__ import annotations

import argparse
import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi import FastAPI, Request

from cli.training import register
from core.registry import CandidateVersion, Registry
from core.store import SQLiteStore
from tests.helpers import UvicornThread
from trainer.seed import seed_teacher_answers

ROOT = Path(__file__).resolve().parents[1]
ROUTE = "clinc-intents"


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def config(tmp_path: Path, student_base_dir: Path, clinc_path: Path) -> Path:
    data = {
        "store": {"path": str(tmp_path / "db.sqlite")},
        "server": {"port": 8999},
        "vllm": {"model_dir": str(student_base_dir)},
        "routes": [{"name": ROUTE, "teacher": {"model": "openai/replay-teacher"}, "labels_dataset": str(clinc_path),
                    "student": {"system_prompt": "Intent label:"}, "confidence_threshold": -0.5,
                    "training": {"holdout_fraction": 0.2}}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_train_then_versions(config: Path, tmp_path: Path, clinc_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    rows = json.loads(clinc_path.read_text())["train"][:200]
    store = SQLiteStore(tmp_path / "db.sqlite")
    seed_teacher_answers(store, ROUTE, [(text, intent) for text, intent in rows])
    store.close()
    status = run_cli(["train", "--config", str(config), "--route", ROUTE, "--adapters-root", str(tmp_path / "ad"),
                      "--max-steps", "3", "--json", "--no-progress"])
    assert status == 0
    candidate = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert candidate["version"] == "v1" and candidate["status"] in ("candidate", "rejected")
    assert Path(candidate["detector_path"]).is_file()  # the router's OOD detector, fitted with this version
    assert (Path(candidate["adapter_path"]) / "adapter_config.json").is_file()
    version_dir = Path(candidate["adapter_path"]).parent
    for path in [version_dir, *version_dir.rglob("*")]:  # distilled from logged prompts: private
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path

    assert run_cli(["versions", "--config", str(config), "--route", ROUTE, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [item["version"] for item in listed] == ["v1"]
    assert listed[0]["metrics"]["candidate"]["confidence_threshold"] == -0.5  # what the cascade serves it at
    learned = listed[0]["metrics"]["learned_router"]  # tried on the candidate's own holdout answers
    assert learned["pairs"] == listed[0]["holdout_examples"] and ("path" in learned or "skipped" in learned)
    assert run_cli(["versions", "--config", str(config), "--route", ROUTE]) == 0
    assert "v1" in capsys.readouterr().out


def test_train_without_data_exits_nonzero(config: Path, tmp_path: Path) -> None:
    assert run_cli(["train", "--config", str(config), "--route", ROUTE, "--no-detector", "--no-progress",
                    "--adapters-root", str(tmp_path / "ad")]) == 3


def test_unknown_route_is_an_error(config: Path) -> None:
    assert run_cli(["versions", "--config", str(config), "--route", "nope"]) == 2


@pytest.fixture
def admin_api() -> Any:
    """A stand-in for the gateway's admin API that records the calls it gets."""
    app, calls = FastAPI(), []

    @app.post("/admin/routes/{route}/{action}")
    async def admin(route: str, action: str, request: Request) -> dict[str, Any]:
        body = await request.body()
        calls.append((route, action, json.loads(body) if body else None, request.headers.get("authorization")))
        return {"name": route, "student_version": "v2"}

    with UvicornThread(app) as server:
        yield server.url, calls


def test_promote_and_rollback_call_the_admin_api(config: Path, admin_api: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    url, calls = admin_api
    monkeypatch.setenv("DISTILLGATE_ADMIN_TOKEN", "s3cret")
    assert run_cli(["promote", "--config", str(config), "--route", ROUTE, "--version", "v2",
                    "--gateway-url", url]) == 0
    assert run_cli(["rollback", "--config", str(config), "--route", ROUTE, "--gateway-url", url]) == 0
    assert calls == [(ROUTE, "promote", {"version": "v2"}, "Bearer s3cret"), (ROUTE, "rollback", None, "Bearer s3cret")]


def test_promote_reports_an_unreachable_gateway(config: Path) -> None:
    assert run_cli(["promote", "--config", str(config), "--route", ROUTE, "--version", "v2",
                    "--gateway-url", "http://127.0.0.1:9"]) == 1


def test_registry_rollback_target_skips_rolled_back(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "db.sqlite")
    registry = Registry(store)
    for version in ("v1", "v2", "v3"):
        registry.record(CandidateVersion(ROUTE, version, "candidate", f"/a/{version}"))
        registry.set_live(ROUTE, version)
    assert registry.next_version(ROUTE) == "v4"
    assert registry.rollback_target(ROUTE).version == "v2"
    registry.set_live(ROUTE, "v2")
    registry.mark(ROUTE, "v3", "retired", note="rolled back")
    assert registry.rollback_target(ROUTE).version == "v1"


@pytest.mark.integration
def test_bench_train_quick(tmp_path: Path, student_base_dir: Path) -> None:
    out = tmp_path / "train.json"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train.py"), "--quick", "--base-dir", str(student_base_dir),
         "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["train_examples"] > 200 and result["steps"] == 20
    assert result["train_examples_per_s"] > 0 and 0 <= result["heldout_agreement"] <= 1
    first, second = result["curve"]
    assert first["cold"]["warm_start_from"] is None and "warm" not in first
    assert second["warm"]["warm_start_from"] == first["cold"]["version"]  # continual training
    assert second["warm"]["trained_on"] < second["warm"]["train_examples"]  # new answers + replay only
    assert [row[0] for row in result["table"]] == [200, 300] and result["table"][1][6] > 0  # warm cycle time
    assert 0 <= second["warm"]["test"]["served_share"] <= 1 and second["warm"]["test"]["examples"] == 60
    # ~30 holdout answers: under learned_router.min_pairs, so the version ships without one, and says why.
    assert "< min_pairs" in second["warm"]["test"]["learned_router"]["trained"]["skipped"]
