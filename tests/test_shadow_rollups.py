"""The shadow-comparison rollups (core/store/shadow_rollups.py): every tier equals the shadow log
grouped at its granularity, m012 backfills them, and ``report``'s shadow figures read from them
equal the raw query over windows cut mid-day, mid-hour and mid-minute, on both back-ends."""

from __future__ import annotations

import random
from typing import Any

import pytest

from core.store import reporting, shadow_rollups
from core.store.shadow_rollups import TIERS
from tests.fixtures_postgres import StoreBackend
from tests.test_rollups import _rerun_backfill

BASE = 1_700_000_000.0  # 22:13:20 UTC


def _shadow(count: int, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"request_id": f"r{i}", "created_at": BASE + i * 1013.7 + rng.random(), "route": rng.choice(["a", "b"]),
             "router_score": rng.random(), "agree": rng.choice([0, 1, 1, None]),
             "served_by": rng.choice(["student", "teacher", None]), "cost_usd": rng.choice([rng.randint(1, 999) / 1e5, None])}
            for i in range(count)]


def _fill(store: Any, count: int = 600) -> None:
    rows = _shadow(count)
    store.insert_shadow_results(rows[:250])
    store.insert_shadow_results(rows[250:])


def _tier(store: Any, tier: Any) -> list[dict[str, Any]]:
    return store.query(f"select {tier.key} as k, route, comparisons, agreements, served_comparisons, served_agreements, "
                       f"cost_usd from {tier.table} order by 1, 2")


def _raw_tier(store: Any, tier: Any) -> list[dict[str, Any]]:
    key = store.dialect.floor_div("created_at", str(tier.seconds))
    return store.query(f"""
        select {key} as k, route, count(*) as comparisons, sum(coalesce(agree, 0)) as agreements,
               sum(case when served_by = 'student' then 1 else 0 end) as served_comparisons,
               sum(case when served_by = 'student' then coalesce(agree, 0) else 0 end) as served_agreements,
               sum(coalesce(cost_usd, 0.0)) as cost_usd
        from shadow_results group by 1, 2 order by 1, 2""")


def _same(a: list[dict[str, Any]], b: list[dict[str, Any]], cost: str = "cost_usd") -> None:
    assert [{k: v for k, v in r.items() if k != cost} for r in a] == [{k: v for k, v in r.items() if k != cost} for r in b]
    for x, y in zip(a, b, strict=True):  # float sums in another order: equal to rounding
        assert abs(float(x[cost]) - float(y[cost])) < 1e-9


def test_every_tier_equals_the_shadow_log_at_its_granularity(store_backend: StoreBackend) -> None:
    store = store_backend.open()
    _fill(store)
    for tier in TIERS:
        raw = _raw_tier(store, tier)
        assert len(raw) > 1
        _same(_tier(store, tier), raw)


def test_m012_backfills_from_the_shadow_log(store_backend: StoreBackend) -> None:
    store = store_backend.open()
    _fill(store, 300)
    store.close()
    _rerun_backfill(store_backend, [f'DROP TABLE "{tier.table}"' for tier in TIERS]
                    + ['DROP INDEX "idx_shadow_results_created_at"',
                       "DELETE FROM _migrations WHERE name = 'm012_shadow_rollups'"])
    store = store_backend.open()
    for tier in TIERS:
        _same(_tier(store, tier), _raw_tier(store, tier))


@pytest.mark.parametrize("offset", [0.0, 86400 * 2 + 3600 * 5 + 60 * 7 + 13.25, 86400 * 4 + 59.5])
def test_report_shadow_figures_equal_the_raw_query(store_backend: StoreBackend, offset: float) -> None:
    store = store_backend.open()
    _fill(store)
    start = BASE + offset if offset else 0.0
    rolled = sorted(shadow_rollups.summary(store, start), key=lambda r: r["route"])
    raw = sorted(store.query(reporting._SHADOW_SQL, [start]), key=lambda r: r["route"])
    assert len(raw) == 2 and all(r["comparisons"] > 10 for r in raw)
    _same(rolled, raw, "shadow_cost_usd")
