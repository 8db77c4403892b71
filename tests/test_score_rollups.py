"""The router-score rollups (core/store/score_rollups.py) and the route page's calibration
curve read from them (core/store/score_reads.py, router/calibration.py): every tier equals the
raw request and shadow logs bucketed at its granularity, a window cut mid-day, mid-hour and
mid-minute equals the raw rows' histogram exactly, and the curve equals the raw curve at the
snapped edges, on both back-ends."""

from __future__ import annotations

import random
from typing import Any

import pytest

from core.store import reporting, score_reads, score_rollups
from core.store.score_rollups import SCORE_EDGES, TIERS, bucket_of, snap
from router import calibration
from tests.fixtures_postgres import StoreBackend
from tests.test_rollups import _rerun_backfill

BASE = 1_700_000_000.0  # 22:13:20 UTC: the rows start mid-day, mid-hour and mid-minute
STEP = 2 ** (1 / 32)  # a snapped threshold's largest shortfall, as a factor


def _score(rng: random.Random, index: int) -> float | None:
    special = {0: None, 1: 0.0, 2: 0.5, 3: SCORE_EDGES[300], 4: 1e6, 5: 3e-6}  # none, zero, edges, out of range
    return special.get(index % 37, round(rng.uniform(0.02, 1.4), 4))


def _rows(count: int, seed: int = 5) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Requests over about six days, and a shadow comparison for one in three."""
    rng = random.Random(seed)
    requests = [{"id": f"s{i}", "created_at": BASE + i * 1013.7 + rng.random(), "route": rng.choice(["a", "b"]),
                 "target": "student", "status_code": 200, "router_score": _score(rng, i)} for i in range(count)]
    shadow = [{"request_id": row["id"], "created_at": row["created_at"] + rng.uniform(0, 90), "route": row["route"],
               "router_score": row["router_score"],
               "agree": int(rng.random() < (0.98 if (row["router_score"] or 0) < 0.6 else 0.6))} for row in requests[::3]]
    return requests, shadow


def _fill(store: Any, count: int = 600) -> None:
    requests, shadow = _rows(count)
    store.insert_requests(requests[:400])
    store.insert_requests(requests[350:])  # 50 replayed from the spool
    store.insert_requests([{**requests[10], "router_score": 0.77}, {**requests[11], "router_score": None}])  # rewrites
    store.insert_shadow_results(shadow[:100])
    store.insert_shadow_results(shadow[100:])


def _raw_tier(store: Any, tier: Any) -> dict[tuple[int, str, int], list[int]]:
    """The tier computed from the raw logs as they are now."""
    expected: dict[tuple[int, str, int], list[int]] = {}
    for table, counts in (("requests", lambda r: [1, 0, 0]), ("shadow_results", lambda r: [0, 1, r["agree"]])):
        extra = ", agree" if table == "shadow_results" else ""
        for row in store.query(f"select created_at, route, router_score{extra} from {table} "
                               "where router_score is not null"):
            key = (int(row["created_at"] // tier.seconds), row["route"], bucket_of(row["router_score"]))
            total = expected.setdefault(key, [0, 0, 0])
            for index, value in enumerate(counts(row)):
                total[index] += value
    return expected


def _tier(store: Any, tier: Any) -> dict[tuple[int, str, int], list[int]]:
    rows = store.query(f"select {tier.key} as k, route, bucket, requests, comparisons, agreements from {tier.table}")
    return {(r["k"], r["route"], r["bucket"]): [r["requests"], r["comparisons"], r["agreements"]]
            for r in rows if any((r["requests"], r["comparisons"], r["agreements"]))}


def test_bucket_edges() -> None:
    assert bucket_of(-1.0) == bucket_of(0.0) == 0 and bucket_of(1e-9) == 1
    assert bucket_of(SCORE_EDGES[5]) == 5 and bucket_of(SCORE_EDGES[5] * 1.000001) == 6  # closed on the right
    assert bucket_of(1e9) == len(SCORE_EDGES) == score_rollups.SCORE_BUCKETS - 1
    assert snap(-0.1) == -1 and snap(0.0) == 0 and snap(SCORE_EDGES[7]) == 7
    for threshold in (0.013, 0.3, 0.5, 0.517, 0.9, 1.7, 42.0):
        assert threshold / STEP < SCORE_EDGES[snap(threshold)] <= threshold


def test_every_tier_equals_the_raw_logs_bucketed(store_backend: StoreBackend) -> None:
    store = store_backend.open()
    _fill(store)
    for tier in TIERS:
        expected = _raw_tier(store, tier)
        assert len(expected) > 50 and _tier(store, tier) == expected, tier.table


def test_m011_backfills_from_the_logs(store_backend: StoreBackend) -> None:
    store = store_backend.open()
    _fill(store, 300)
    written = {tier: _tier(store, tier) for tier in TIERS}
    store.close()
    _rerun_backfill(store_backend, [f'DROP TABLE "{tier.table}"' for tier in TIERS]
                    + ["DELETE FROM _migrations WHERE name = 'm011_score_rollups'"])
    store = store_backend.open()
    for tier in TIERS:
        assert _tier(store, tier) == written[tier] == _raw_tier(store, tier), tier.table


@pytest.mark.parametrize("offset", [0.0, 86400 * 2 + 3600 * 5 + 60 * 7 + 13.25, 86400 * 4 + 59.5])
def test_windowed_histogram_and_curve_equal_the_raw_rows(store_backend: StoreBackend, offset: float) -> None:
    store = store_backend.open()
    _fill(store)
    start = BASE + offset
    for route in ("a", "b"):
        raw_scores = [r["router_score"] for r in store.query(reporting._REQUEST_SCORES_SQL, [route, start])]
        raw_shadow = [(r["router_score"], r["agree"]) for r in store.query(reporting._SHADOW_SCORES_SQL, [route, start])]
        histogram = score_reads.score_histogram(store, route, start)
        assert histogram == score_reads.ScoreHistogram.from_raw(raw_scores, raw_shadow)
        assert sum(histogram.requests) == len(raw_scores) > 0 and sum(histogram.comparisons) == len(raw_shadow) > 0
        thresholds = [0.0, 0.1, 0.3, 0.5, 0.7777, 1.0, 1.5, 2e6]
        curve = calibration.histogram_curve(histogram, thresholds)
        edges = [SCORE_EDGES[snap(t)] for t in thresholds]
        assert curve == [calibration.CalibrationPoint(t, p.student_share, p.expected_agreement, p.shadow_samples)
                         for t, p in zip(thresholds, calibration.calibration_curve(raw_scores, raw_shadow, edges),
                                         strict=True)]


def test_route_page_reads_the_rollups(store_backend: StoreBackend) -> None:
    """The dashboard's whole calibration payload: the curve at the snapped edges, and the
    certified curve's counts exact at each of its edges."""
    store = store_backend.open()
    _fill(store)
    result = calibration.route_calibration(store, "a", current=0.5, since_s=None, target_agreement=0.7)
    scores, shadow = reporting.calibration_scores(store, "a")
    assert result["scored_requests"] == len(scores) and result["shadow_samples"] == len(shadow)
    edges = [SCORE_EDGES[snap(p["threshold"])] for p in result["points"]]
    raw = calibration.calibration_curve(scores, shadow, edges)
    assert [(p["student_share"], p["expected_agreement"], p["shadow_samples"]) for p in result["points"]] == \
           [(r.student_share, r.expected_agreement, r.shadow_samples) for r in raw]
    assert result["max"] == round(SCORE_EDGES[-1] * 1.1, 3)  # a score past the edges reads as the last edge
    certified = calibration.calibrate_binned(*_comparisons(shadow), SCORE_EDGES, target_agreement=0.7)
    assert certified.recommended_threshold == result["recommended_threshold"] is not None
    for point in certified.curve:
        under = [agree for score, agree in shadow if score <= point.threshold]
        assert (point.accepted, point.disagreements) == (len(under), len(under) - sum(under))


def test_the_sliders_range_is_the_top_buckets_edge() -> None:
    histogram = score_reads.ScoreHistogram.from_raw([0.3, 1.3], [])
    top = calibration.threshold_range(calibration._histogram_top(histogram), 0.5)
    assert calibration.threshold_range([0.3, 1.3], 0.5) <= top <= round(1.3 * STEP * 1.1, 3)
    assert calibration.threshold_range(calibration._histogram_top(score_reads.ScoreHistogram()), 0.5) == 1.0


def _comparisons(shadow: list[tuple[float, int]]) -> tuple[list[int], list[int]]:
    histogram = score_reads.ScoreHistogram.from_raw([], shadow)
    return histogram.comparisons, histogram.agreements


def test_binned_calibration_equals_the_exact_one_on_edge_scores() -> None:
    """Scores that sit on the edges lose nothing to the buckets: the same curve, the same threshold."""
    rng = random.Random(2)
    pairs = [(SCORE_EDGES[rng.randrange(380, 460)], int(rng.random() < 0.97)) for _ in range(3000)]
    exact = calibration.calibrate(pairs, target_agreement=0.9)
    binned = calibration.calibrate_binned(*_comparisons(pairs), SCORE_EDGES, target_agreement=0.9)
    assert exact.recommended_threshold is not None
    assert binned.model_dump() == exact.model_dump()
