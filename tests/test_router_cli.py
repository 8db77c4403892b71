"""Smoke tests of ``distillgate eval-ood``, ``distillgate calibrate`` and ``bench/router.py``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from core.store import SQLiteStore
from tests.helpers import CLINC, ROOT

pytestmark = pytest.mark.integration  # every command runs as a subprocess


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cli.main", "--log-level", "WARNING", *args],
                          capture_output=True, text=True, cwd=ROOT, env=environment, timeout=timeout)


@pytest.fixture
def tiny_clinc(tmp_path: Path) -> Path:
    """A CLINC150-format file with 6 intents: any file in the format must work."""
    data = json.loads(CLINC.read_text())
    intents = sorted({intent for _, intent in data["train"]})[:: 25][:6]
    def pick(split: str, per_intent: int) -> list[list[str]]:
        return [row for intent in intents for row in [r for r in data[split] if r[1] == intent][:per_intent]]

    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"train": pick("train", 20), "test": pick("test", 5),
                                "oos_test": data["oos_test"][:30]}))
    return path


def test_eval_ood_json(tiny_clinc: Path) -> None:
    result = run_cli("eval-ood", "--data", str(tiny_clinc), "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["detector"] == "knn" and figures["train"] == 120
    assert 0.8 <= figures["auroc"] <= 1.0
    assert 0 <= figures["fpr_at_95_tpr"] <= 1 and 0 <= figures["oos_recall_at_95_inscope"] <= 1
    assert figures["latency_ms"]["p50"] > 0


def test_near_ood_protocol_is_deterministic_for_a_seed(tiny_clinc: Path) -> None:
    from router.artifacts import create_embedder
    from router.eval_ood import evaluate, held_out_intents

    config = argparse.Namespace(embedder="static", artifacts_dir=ROOT / "var" / "models" / "router", cache_mb=8.0)
    embedder = create_embedder(config, build=True)
    first = evaluate(tiny_clinc, embedder=embedder, protocol="near", seeds=[0, 1], holdout_fraction=0.34)
    again = evaluate(tiny_clinc, embedder=create_embedder(config), protocol="near", seeds=[0, 1],
                     holdout_fraction=0.34)
    assert first["near"] == again["near"] and "auroc" not in first  # near only
    held = [row["held_out_intents"] for row in first["near"]["seeds"]]
    assert len(held[0]) == 2 and held[0] != held[1]  # 34 % of 6 intents, a different draw per seed
    intents = sorted({intent for _, intent in json.loads(tiny_clinc.read_text())["train"]})
    assert held[0] == held_out_intents(intents, 0.34, 0) == held_out_intents(list(reversed(intents)), 0.34, 0)
    for row in first["near"]["seeds"]:
        assert row["unknown"] == 10 and row["known"] == 20 and 0.0 <= row["auroc"] <= 1.0


def test_eval_ood_near_protocol_from_the_command_line(tiny_clinc: Path) -> None:
    result = run_cli("eval-ood", "--data", str(tiny_clinc), "--protocol", "both", "--seeds", "3,4", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["embedder"].startswith("static") and figures["dim"] == 256
    assert [row["seed"] for row in figures["near"]["seeds"]] == [3, 4]
    assert set(figures["near"]["mean"]) == {"auroc", "fpr_at_95_tpr", "oos_recall_at_95_inscope"}
    assert 0.8 <= figures["auroc"] <= 1.0


def test_eval_ood_with_knn_tuned_is_deterministic(tiny_clinc: Path) -> None:
    """The tuned detector through the command: it tunes per near-OOD seed, and twice gives the same figures."""
    args = ("eval-ood", "--data", str(tiny_clinc), "--detector", "knn_tuned", "--protocol", "both", "--seeds", "3",
            "--json")
    first, again = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    figures, repeated = json.loads(first.stdout), json.loads(again.stdout)
    assert figures["detector"] == "knn_tuned" and 0.8 <= figures["auroc"] <= 1.0
    assert (figures["auroc"], figures["near"]) == (repeated["auroc"], repeated["near"])


def test_eval_ood_rejects_a_file_in_another_format(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": [["hello", "greet"]]}))
    result = run_cli("eval-ood", "--data", str(bad), "--detector", "mahalanobis")
    assert result.returncode == 2 and "test" in result.stdout


@pytest.fixture
def config_with_shadow(tmp_path: Path) -> Path:
    store_path = tmp_path / "db.sqlite"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"port": 9},  # nothing listens there: --apply must fall back to the store
        "store": {"path": str(store_path)},
        "routes": [{"name": "intents", "teacher": {"model": "openai/x"}}]}))
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 1, 3000)
    agree = (rng.uniform(size=3000) >= np.where(scores < 0.5, 0.005, 0.5)).astype(int)
    store = SQLiteStore(store_path)
    store.insert_shadow_results([{"request_id": f"r{i}", "created_at": float(i), "route": "intents",
                                  "student_version": "v1", "router_score": float(s), "agree": int(a)}
                                 for i, (s, a) in enumerate(zip(scores, agree, strict=True))])
    store.close()
    return config


def test_calibrate_prints_a_certified_recommendation(config_with_shadow: Path, tmp_path: Path) -> None:
    out = tmp_path / "calibration"
    result = run_cli("calibrate", "--config", str(config_with_shadow), "--route", "intents", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "recommended ood_threshold" in result.stdout and "Clopper-Pearson" in result.stdout
    assert "95%" in result.stdout
    saved = json.loads((out / "calibration-intents.json").read_text())
    assert 0.3 < saved["recommended_threshold"] <= 0.55
    assert (out / "calibration-intents.png").stat().st_size > 1000


def test_calibrate_unknown_route(config_with_shadow: Path) -> None:
    result = run_cli("calibrate", "--config", str(config_with_shadow), "--route", "nope")
    assert result.returncode == 2 and "nope" in result.stderr


def test_calibrate_apply_without_gateway_persists_like_the_admin_api(config_with_shadow: Path, tmp_path: Path) -> None:
    result = run_cli("calibrate", "--config", str(config_with_shadow), "--route", "intents", "--apply",
                     "--out", str(tmp_path / "c"))
    assert result.returncode == 0, result.stderr
    store = SQLiteStore(tmp_path / "db.sqlite")
    threshold = store.route_overrides("intents")["ood_threshold"]
    assert 0.3 < threshold <= 0.55
    assert store.route_audit("intents")[0]["actor"] == "calibrate"
    store.close()


class _AdminStub(BaseHTTPRequestHandler):
    seen: list[dict[str, Any]] = []

    def do_PATCH(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.seen.append({"path": self.path, "auth": self.headers.get("authorization"), "body": body})
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


def test_calibrate_apply_patches_the_running_gateway(config_with_shadow: Path, tmp_path: Path) -> None:
    server = HTTPServer(("127.0.0.1", 0), _AdminStub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = run_cli("calibrate", "--config", str(config_with_shadow), "--route", "intents", "--apply",
                         "--gateway-url", f"http://127.0.0.1:{server.server_port}", "--out", str(tmp_path / "c"),
                         env={"DISTILLGATE_ADMIN_TOKEN": "admin-secret"})
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    call = _AdminStub.seen[-1]
    assert call["path"] == "/admin/routes/intents" and call["auth"] == "Bearer admin-secret"
    assert 0.3 < call["body"]["ood_threshold"] <= 0.55
    store = SQLiteStore(tmp_path / "db.sqlite")
    assert "ood_threshold" not in store.route_overrides("intents")  # the gateway persists, not us
    store.close()


def test_bench_router_quick() -> None:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "bench/router.py", "--quick", "--embedders", "static", "onnx"],
                            capture_output=True, text=True, cwd=ROOT, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["embedders"]) == {"static", "onnx"}
    for measured in report["embedders"].values():
        assert set(measured["detectors"]) == {"knn", "knn_lda", "mahalanobis"}
        assert measured["detectors"]["knn"]["auroc"] > 0.8 and 0.5 < measured["near_default"]["auroc"] <= 1.0
        assert measured["decide"]["single"]["p50_ms"] > 0 and measured["decide"]["concurrent"]["decisions_per_s"] > 0
        assert measured["decide"]["concurrent"]["concurrency"] == 64
        assert set(measured["goals"]) == {"decision_p50_ms", "decisions_per_s", "far_auroc", "near_auroc"}
    assert report["embedders"]["static"]["dim"] == 256 and report["embedders"]["onnx"]["dim"] == 384


def test_init_router_builds_the_configured_embedder_offline_once(tmp_path: Path) -> None:
    artifacts = tmp_path / "router"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"router": {"embedder": "onnx", "artifacts_dir": str(artifacts)},
                                      "routes": [{"name": "intents", "teacher": {"model": "openai/x"}}]}))
    first = run_cli("init-router", "--config", str(config), env={"HF_HUB_OFFLINE": "1"})
    assert first.returncode == 0, first.stderr
    built = artifacts / "onnx"
    assert {"model.onnx", "tokenizer.json", "built.ok"} <= {path.name for path in built.iterdir()}
    assert not list(artifacts.glob("*.building-*"))  # staged, then renamed into place
    stamp = (built / "model.onnx").stat().st_mtime_ns
    again = run_cli("init-router", "--config", str(config))
    assert again.returncode == 0 and (built / "model.onnx").stat().st_mtime_ns == stamp  # not rebuilt
    from router.artifacts import create_encoder

    encoder = create_encoder("onnx", artifacts)
    vectors = encoder.encode(["check my balance", "what is my balance"])
    assert vectors.shape == (2, 384) and float(vectors[0] @ vectors[1]) > 0.7
    with pytest.raises(FileNotFoundError, match="init-router"):
        create_encoder("static", artifacts)  # not built here: the error names the step
