"""The hourly and daily rollup tiers (core/store/rollups.py ``TIERS``) and the windowed reads
over them (core/store/rollup_reads.py): every tier equals the raw log's aggregates at its
granularity, and a report over a window cut mid-day, mid-hour and mid-minute equals the raw
queries (percentiles within the histogram's stated bound), on both back-ends."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from core.store import reporting, rollup_reads
from core.store.rollups import TIERS
from tests.fixtures_postgres import StoreBackend
from tests.test_rollups import _by, _close, _rerun_backfill

BASE = 1_700_000_000.0  # 22:13:20 UTC: the rows start mid-day, mid-hour and mid-minute
BOUND = 2 ** (1 / 8)  # rollup_reads.percentile's relative error


def _rows(count: int, seed: int = 3) -> list[dict[str, Any]]:
    """Over about six days, so that every tier holds several keys."""
    rng = random.Random(seed)
    return [{"id": f"t{i}", "created_at": BASE + i * 1013.7 + rng.random(), "route": rng.choice(["a", "b"]),
             "target": rng.choice(["teacher", "student", None]), "status_code": rng.choice([200, 200, 500]),
             "client_key_id": rng.choice(["k1", "k2", None]), "student_version": rng.choice(["v1", None]),
             "prompt_tokens": rng.randint(1, 900), "completion_tokens": rng.randint(1, 90),
             "latency_ms": rng.lognormvariate(5, 1.5) if i % 17 else None, "fallback": int(i % 11 == 0),
             "cost_usd": rng.randint(1, 1000) / 1e6, "teacher_cost_usd": rng.randint(1, 1000) / 1e5}
            for i in range(count)]


def _tier_matches_raw(store: Any, tier: Any) -> None:
    key = store.dialect.floor_div("created_at", str(tier.seconds))
    raw = store.query(f"""
        select {key} as k, route, coalesce(target, '') as target, coalesce(student_version, '') as student_version,
               coalesce(client_key_id, '') as client_key_id, count(*) as requests,
               sum(case when status_code >= 400 then 1 else 0 end) as errors, sum(fallback) as fallbacks,
               sum(prompt_tokens) as prompt_tokens, sum(case when latency_ms is not null then 1 else 0 end) as latency_count,
               sum(cost_usd) as cost_usd, sum(teacher_cost_usd) as teacher_cost_usd
        from requests group by 1, 2, 3, 4, 5 order by 1, 2, 3, 4, 5""")
    rolled = store.query(f"""
        select {tier.key} as k, route, target, student_version, client_key_id, requests, errors, fallbacks,
               prompt_tokens, latency_count, cost_usd, teacher_cost_usd
        from {tier.table} order by 1, 2, 3, 4, 5""")
    assert len(rolled) > 1, tier
    _close(rolled, raw)


def test_every_tier_equals_the_raw_log_at_its_granularity(store_backend: StoreBackend) -> None:
    store = store_backend.open()
    rows = _rows(600)
    store.insert_requests(rows[:400])
    store.insert_requests(rows[350:])  # 50 replayed from the spool
    store.insert_requests([{**rows[9], "status_code": 502, "cost_usd": 0.5, "latency_ms": 9000.0}])  # a rewrite
    for tier in TIERS:
        _tier_matches_raw(store, tier)


def test_m009_backfills_hours_and_days_from_the_minute_rollups(store_backend: StoreBackend) -> None:
    store = store_backend.open()
    store.insert_requests(_rows(300))
    store.close()
    _rerun_backfill(store_backend, ['DROP TABLE "request_rollups_hourly"', 'DROP TABLE "request_rollups_daily"',
                                    "DELETE FROM _migrations WHERE name = 'm009_rollup_tiers'"])
    store = store_backend.open()
    for tier in TIERS:
        _tier_matches_raw(store, tier)


def _exact_quantiles(rows: list[dict[str, Any]], start: float) -> dict[str, dict[str, dict[str, float]]]:
    groups: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        if row["created_at"] >= start and row["latency_ms"] is not None:
            for target in (row["target"] or "none", "all"):
                groups.setdefault(row["route"], {}).setdefault(target, []).append(row["latency_ms"])
    return {route: {target: {name: sorted(values)[max(0, math.ceil(q * len(values)) - 1)]
                             for name, q in (("p50", 0.5), ("p99", 0.99))}
                    for target, values in by_target.items()} for route, by_target in groups.items()}


@pytest.mark.parametrize("offset", [0.0, 86400 * 2 - 13.4, 86400 * 3 + 5 * 3600, 86400 * 5 + 1800 + 59.5])
def test_windowed_report_equals_the_raw_log(store_backend: StoreBackend, offset: float) -> None:
    """A window starting mid-day/hour/minute reads each of its parts from a different tier."""
    store = store_backend.open()
    rows = _rows(600)
    store.insert_requests(rows)
    start = BASE + offset if offset else 0.0
    params = rollup_reads.window_params(start)
    _close(_by(store.query(rollup_reads.SUMMARY_SQL, params), "route"),
           _by(store.query(reporting._SUMMARY_SQL, [start]), "route"))
    _close(_by(store.query(rollup_reads.KEY_SUMMARY_SQL, params), "client_key_id"),
           _by(store.query(reporting._KEY_SUMMARY_SQL, [start]), "client_key_id"))
    got, exact = rollup_reads.latency_quantiles(store, start), _exact_quantiles(rows, start)
    assert got.keys() == exact.keys() and all(got[r].keys() == exact[r].keys() for r in exact)
    for route, by_target in exact.items():
        for target, quantiles in by_target.items():
            for name, value in quantiles.items():
                assert value / BOUND <= got[route][target][name] <= value * BOUND, (route, target, name)


def test_percentile_is_within_the_stated_bound() -> None:
    from core.store.rollups import BUCKETS, bucket_of

    rng = random.Random(5)
    for _ in range(200):
        values = sorted(rng.lognormvariate(4, 2) + 1 for _ in range(rng.randint(1, 300)))
        counts = [0] * BUCKETS
        for value in values:
            counts[bucket_of(value)] += 1
        for quantile in (0.5, 0.9, 0.99):
            exact = values[max(0, math.ceil(quantile * len(values)) - 1)]
            read = rollup_reads.percentile(counts, quantile)
            assert (read is not None and exact / BOUND <= read <= exact * BOUND) or exact >= 2 ** 18


@pytest.mark.parametrize("width", [60, 900, 3600, 6 * 3600, 86400, 7 * 86400])
def test_cost_series_from_the_tiers_equals_the_raw_log(store_backend: StoreBackend, width: int) -> None:
    """Each bucket width reads the tiers that fit in it; the figures are the raw query's."""
    store = store_backend.open()
    store.insert_requests(_rows(600))
    for start in (0.0, BASE + 86400 * 2 + 3 * 3600 + 7.5):
        tiers = rollup_reads.cost_series_tiers(width)
        got = store.query(rollup_reads.cost_series_sql(tiers, store.dialect.floor_div("t", "?")),
                          [width, width, *rollup_reads.window_params(start, ["a"], tiers=tiers)])
        raw = store.query(reporting._COST_SERIES_SQL.format(bucket=store.dialect.floor_div("created_at", "?")),
                          [width, width, "a", start])
        assert got and (len(got) > 1 or width == 7 * 86400)
        _close([{**r, "bucket": float(r["bucket"])} for r in got], [{**r, "bucket": float(r["bucket"])} for r in raw])


def test_month_spend_from_the_tiers_equals_the_raw_log(store_backend: StoreBackend) -> None:
    store = store_backend.open()
    month = 1_701_388_800.0  # 2023-12-01 UTC
    shift = month - 3.3 * 86400 - BASE  # the month starts mid-log
    store.insert_requests([{**r, "created_at": r["created_at"] + shift} for r in _rows(600)])
    now = month + 5 * 86400
    raw = {r["client_key_id"]: r["cost_usd"] for r in store.query(reporting._KEY_SPEND_SQL, [month])}
    got = reporting.month_spend_by_key(store, now)
    assert got.keys() == raw.keys() == {"k1", "k2"}
    assert all(got[key] == pytest.approx(raw[key], abs=1e-9) for key in raw)


def test_purge_keeps_every_tier(store_backend: StoreBackend) -> None:
    """Retention deletes request bodies and keeps the counters, in every tier."""
    store = store_backend.open()
    store.insert_requests(_rows(200))
    store.purge_before(BASE + 100 * 1013.7)
    assert store.count_requests() == 100
    for tier in TIERS:
        assert store.query(f"select sum(requests) as n from {tier.table}")[0]["n"] == 200, tier


def test_a_days_tokens_can_pass_two_to_the_31(store_backend: StoreBackend) -> None:
    """An hour's and a day's token sums are BIGINT on PostgreSQL: past 2**31 the writer's
    upsert would otherwise fail, and the request rows with it."""
    from core.store.reporting import route_summaries

    store = store_backend.open()
    [row] = _rows(1)  # two requests of one group, a minute apart: one hourly and one daily row
    rows = [{**row, "id": f"big{i}", "route": "a", "created_at": BASE + 60 * i, "prompt_tokens": 1_500_000_000}
            for i in range(2)]
    store.insert_requests(rows[:1])
    store.insert_requests(rows[1:])
    [summary] = route_summaries(store, ["a"], since_s=None)
    assert summary.prompt_tokens == 3_000_000_000 and isinstance(summary.prompt_tokens, int)


def test_m010_backfills_who_served_each_shadowed_request(store_backend: StoreBackend) -> None:
    """Shadow rows logged before m010 learn who served their request from the request log."""
    store = store_backend.open()
    rows = _rows(4)
    store.insert_requests([{**row, "target": target} for row, target in zip(rows, ("student", "teacher") * 2,
                                                                             strict=True)])
    store.insert_shadow_results([{"request_id": row["id"], "created_at": row["created_at"], "route": row["route"],
                                  "agree": 1} for row in rows])
    store.close()
    _rerun_backfill(store_backend, ['UPDATE shadow_results SET served_by = NULL',
                                    'ALTER TABLE shadow_results DROP COLUMN served_by',
                                    "DELETE FROM _migrations WHERE name = 'm010_shadow_served_by'"])
    store = store_backend.open()
    served = {row["request_id"]: row["served_by"] for row in store.query("select * from shadow_results")}
    store.close()
    assert served == {row["id"]: target for row, target in zip(rows, ("student", "teacher") * 2, strict=True)}
