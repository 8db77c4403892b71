"""The canary's sequential test and traffic split (router/canary.py): pure functions."""

from __future__ import annotations

import random

import pytest

from core.config import ConfigError, parse_settings
from core.route_config import RolloutConfig
from router.canary import (
    ArmEvidence,
    agreement_bounds,
    decide,
    in_canary,
    live_shadow_rate,
    look_confidence,
    looks_due,
)

CONFIG = RolloutConfig(canary_share=0.1, min_evidence=30, confidence=0.95, tolerance=0.05)


def arm(compared: int, agreement: float, served: int | None = None, negative: int = 0) -> ArmEvidence:
    return ArmEvidence(served=served if served is not None else compared, compared=compared,
                       agreed=round(compared * agreement), negative_feedback=negative)


def test_a_worse_canary_is_rolled_back_at_the_first_look() -> None:
    canary, live = arm(30, 0.3), arm(200, 0.9)
    verdict = decide(canary, live, CONFIG, looks_due(canary, live, CONFIG))
    assert verdict.action == "rollback" and verdict.look == 1
    assert verdict.canary_upper is not None and verdict.canary_upper < 0.9 - 0.05


def test_an_equal_canary_is_promoted_once_the_evidence_is_tight_enough() -> None:
    live = arm(2000, 0.9)
    early = arm(60, 0.9)
    assert decide(early, live, CONFIG, looks_due(early, live, CONFIG)).action == "wait"
    late = arm(480, 0.9)
    verdict = decide(late, live, CONFIG, looks_due(late, live, CONFIG))
    assert verdict.action == "promote"
    assert verdict.canary_lower is not None and verdict.canary_lower >= 0.9 - 0.05


def test_too_little_evidence_waits() -> None:
    # 29 canary comparisons, all disagreeing: no look is due yet, so no verdict but "wait".
    assert looks_due(arm(29, 0.0), arm(500, 1.0), CONFIG) == 0
    assert decide(arm(29, 0.0), arm(500, 1.0), CONFIG, 0).action == "wait"
    # Live lacks evidence: no look either, whatever the canary shows.
    assert looks_due(arm(100, 0.0), arm(10, 1.0), CONFIG) == 0


def test_looks_come_as_the_evidence_doubles_and_spend_alpha() -> None:
    live = arm(1000, 0.9)
    assert [looks_due(arm(n, 0.9), live, CONFIG) for n in (30, 59, 60, 119, 120, 240)] == [1, 1, 2, 2, 3, 4]
    spent = sum(1 - look_confidence(k, 0.95) for k in range(1, 10_000))
    assert spent < 0.05


def test_bounds_are_clopper_pearson() -> None:
    lower, upper = agreement_bounds(30, 30, 0.95)
    assert upper == 1.0 and lower == pytest.approx(0.05 ** (1 / 30), rel=1e-6)  # alpha ** (1 / n): 0.905
    lower, upper = agreement_bounds(0, 30, 0.95)
    assert lower == 0.0 and upper == pytest.approx(1 - 0.05 ** (1 / 30), rel=1e-6)


def test_negative_feedback_blocks_a_canary_that_agrees() -> None:
    live = arm(500, 0.9, served=2000, negative=4)  # 0.2 % of live answers rated down
    canary = arm(200, 0.92, served=200, negative=3)  # 1.5 %, below the 2-point margin: no block
    assert decide(canary, live, CONFIG, looks_due(canary, live, CONFIG)).action != "rollback"
    canary.negative_feedback = 6  # 3 %: above live's share plus the margin
    verdict = decide(canary, live, CONFIG, 0)
    assert verdict.action == "rollback" and "negative feedback" in verdict.reason


def test_time_out_decides_by_point_estimates() -> None:
    live = arm(300, 0.9)
    assert decide(arm(10, 0.95), live, CONFIG, 0, timed_out=True).action == "rollback"  # too little evidence
    assert decide(arm(40, 0.88), live, CONFIG, 1, timed_out=True).action == "promote"
    assert decide(arm(40, 0.80), live, CONFIG, 1, timed_out=True).action == "rollback"


@pytest.mark.parametrize("share", [0.05, 0.1, 0.3])
def test_the_split_gives_the_canary_its_share_reproducibly(share: float) -> None:
    ids = [f"{random.Random(7).getrandbits(128):032x}{index}" for index in range(20_000)]
    picked = [in_canary(request_id, share, seed=3) for request_id in ids]
    assert sum(picked) / len(ids) == pytest.approx(share, abs=0.01)
    assert picked == [in_canary(request_id, share, seed=3) for request_id in ids]  # deterministic
    other_seed = [in_canary(request_id, share, seed=4) for request_id in ids]
    assert other_seed != picked
    assert not any(in_canary(request_id, 0.0) for request_id in ids[:1000])


def test_live_is_shadowed_to_match_the_canarys_evidence() -> None:
    assert live_shadow_rate(RolloutConfig(canary_share=0.1, shadow_rate=1.0), 0.05) == pytest.approx(1 / 9)
    assert live_shadow_rate(RolloutConfig(canary_share=0.1, shadow_rate=0.1), 0.05) == pytest.approx(0.05)
    assert live_shadow_rate(RolloutConfig(canary_share=0.1, live_shadow_rate=0.5), 0.05) == 0.5


def test_rollout_config_is_validated_and_off_by_default() -> None:
    route = {"name": "r1", "teacher": {"model": "openai/m"}}
    settings = parse_settings({"routes": [route]})
    assert not settings.routes[0].rollout.enabled
    with pytest.raises(ConfigError, match=r"routes\.0\.rollout\.canary_share"):
        parse_settings({"routes": [{**route, "rollout": {"canary_share": 1.0}}]})
    with pytest.raises(ConfigError, match=r"routes\.0\.rollout\.canary_shar: unknown key"):
        parse_settings({"routes": [{**route, "rollout": {"canary_shar": 0.1}}]})
