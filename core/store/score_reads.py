"""Reading a route's router-score histogram over a window from the score rollups
(core/store/score_rollups.py), cut like the request tiers (core/store/rollup_reads.py): whole
days, hours and minutes from their tiers, the part-minute at the start from the raw request and
shadow rows. The result equals bucketing the window's raw rows exactly; it reads at most
(days + 23 + 59) x the buckets hit rollup rows plus one minute of raw rows, whatever the log holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from core.store import rollup_reads, score_rollups
from core.store.score_rollups import SCORE_BUCKETS, TIERS, bucket_of


class _Queryable(Protocol):
    def query(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> list[dict[str, Any]]: ...


HISTOGRAM_SQL = ("select bucket, sum(requests) as requests, sum(comparisons) as comparisons, "
                 "sum(agreements) as agreements from ("
                 + rollup_reads.window_sql("bucket, requests, comparisons, agreements", where="and route = ?",
                                           tiers=TIERS)
                 + ") window_rows group by bucket")
_EDGE_REQUESTS_SQL = """
select router_score from requests
where route = ? and created_at >= ? and created_at < ? and router_score is not null
"""
_EDGE_SHADOW_SQL = """
select router_score, agree from shadow_results
where route = ? and created_at >= ? and created_at < ? and router_score is not null
"""


@dataclass
class ScoreHistogram:
    """Per bucket of ``score_rollups.SCORE_EDGES``: scored requests, scored shadow comparisons
    and their agreements."""

    requests: list[int] = field(default_factory=lambda: [0] * SCORE_BUCKETS)
    comparisons: list[int] = field(default_factory=lambda: [0] * SCORE_BUCKETS)
    agreements: list[int] = field(default_factory=lambda: [0] * SCORE_BUCKETS)

    def add(self, bucket: int, requests: int = 0, comparisons: int = 0, agreements: int = 0) -> None:
        self.requests[bucket] += requests
        self.comparisons[bucket] += comparisons
        self.agreements[bucket] += agreements

    @classmethod
    def from_raw(cls, scores: list[float], shadow: list[tuple[float, int]]) -> ScoreHistogram:
        """The same histogram from raw values (the reference the tests and the benchmark compare with)."""
        histogram = cls()
        for score in scores:
            histogram.add(bucket_of(score), requests=1)
        for score, agree in shadow:
            histogram.add(bucket_of(score), comparisons=1, agreements=int(agree or 0))
        return histogram


def score_histogram(store: _Queryable, route: str, start: float) -> ScoreHistogram:
    """The route's histogram of the requests and shadow comparisons logged at or after ``start``."""
    histogram = ScoreHistogram()
    for row in store.query(HISTOGRAM_SQL, rollup_reads.window_params(start, [route], raw=False, tiers=TIERS)):
        histogram.add(int(row["bucket"]), int(row["requests"] or 0), int(row["comparisons"] or 0),
                      int(row["agreements"] or 0))
    edge = [route, start, rollup_reads.tier_bounds(start, TIERS)[0] * float(score_rollups.MINUTE.seconds)]
    for row in store.query(_EDGE_REQUESTS_SQL, edge):
        histogram.add(bucket_of(row["router_score"]), requests=1)
    for row in store.query(_EDGE_SHADOW_SQL, edge):
        histogram.add(bucket_of(row["router_score"]), comparisons=1, agreements=int(row["agree"] or 0))
    return histogram
