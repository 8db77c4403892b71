"""bench/detector_mask.py: the detector with the teacher's out-of-scope prompts in its score vs masked."""

from __future__ import annotations

import argparse

import pytest

from bench.detector_mask import measure
from router.artifacts import create_embedder
from router.eval_ood import load_clinc_format
from tests.helpers import CLINC, ROOT


@pytest.fixture(scope="module")
def static() -> object:
    config = argparse.Namespace(embedder="static", artifacts_dir=ROOT / "var" / "models" / "router", cache_mb=0.0)
    return create_embedder(config, build=True, cache_bytes=0)


def test_masking_the_out_of_scope_prompts_sends_more_of_the_next_ones_to_the_teacher(static: object) -> None:
    splits = load_clinc_format(CLINC)
    in_score = measure(splits, static, 600, "knn", masked=False, thresholds=[0.5])
    masked = measure(splits, static, 600, "knn", masked=True, thresholds=[0.5])
    assert in_score["out_of_scope_prompts"] == "in the score" and masked["out_of_scope_prompts"] == "masked"
    assert masked["auroc"] > in_score["auroc"]
    assert masked["at_threshold"]["0.5"]["oos_sent"] > in_score["at_threshold"]["0.5"]["oos_sent"] + 0.03


def test_drift_reads_known_out_of_scope_prompts_as_seen(static: object) -> None:
    """Masked out of the score, the stream's repeated out-of-scope prompts must not read as novel traffic."""
    masked = measure(load_clinc_format(CLINC), static, 1500, "knn", masked=True, thresholds=[0.5])
    window = masked["drift_window"]
    assert window["novel_share_on_novelty"] < window["novel_share_on_score"] - 0.03, window
