"""Prometheus metrics: one ``GatewayMetrics`` per app, with its own registry (several apps
live in one test process, so nothing is registered globally).

Three sources feed it:
- the request observer (``GatewayMetrics.observe``, registered with ``ChatService``): one
  call per finished request, updating counters and histograms labelled by route and target;
- the feedback service (``GatewayMetrics.count_feedback``): one call per feedback stored;
- a collector run at scrape time, reading what already has a home elsewhere: the live
  student version and threshold (the route table), each route's drift window and the cycles
  drift started (gateway/training/drift.py), the store writers' health, the shadow
  runner's skips, shadow agreement and training runs (the store; shadow rows are read
  incrementally by id, so a scrape never rescans the table).

``GET /metrics`` is open unless ``DISTILLGATE_METRICS_TOKEN`` is set; then it takes that
token (or the admin token) as a bearer. Scrapers get their own token so that Prometheus
never holds the admin token, which can change routes. The figures hold no prompts, answers
or keys; set the token whenever the gateway listens beyond loopback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core.store import STORE_ERRORS, reporting
from gateway.auth import bearer_token, constant_time_in
from gateway.chat.record import RequestRecord
from gateway.errors import AuthenticationFailed

logger = logging.getLogger(__name__)

METRICS_TOKEN_ENV = "DISTILLGATE_METRICS_TOKEN"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# OOD scores are distances in the detector's own units; most thresholds sit in [0, 1].
SCORE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.5, 2.0, 5.0, 10.0)
ROUTE_TARGET = ("route", "target")


class GatewayMetrics:
    """Every metric of one gateway app, in ``self.registry``."""

    def __init__(self, scrape_token: str | None = None) -> None:
        self.registry = CollectorRegistry()
        self.scrape_token = scrape_token
        registry = self.registry
        self.requests = Counter("distillgate_requests", "Chat completion requests finished, by HTTP status.",
                                [*ROUTE_TARGET, "status"], registry=registry)
        self.errors = Counter("distillgate_errors", "Requests that ended in an error status (>= 400).",
                              [*ROUTE_TARGET, "status"], registry=registry)
        self.latency = Histogram("distillgate_request_duration_seconds", "Request time in the gateway, end to end.",
                                 ROUTE_TARGET, buckets=LATENCY_BUCKETS, registry=registry)
        self.upstream_latency = Histogram("distillgate_upstream_duration_seconds",
                                          "Time spent in the model that answered (student or teacher).",
                                          ROUTE_TARGET, buckets=LATENCY_BUCKETS, registry=registry)
        self.tokens = Counter("distillgate_tokens", "Tokens, by kind (prompt = in, completion = out).",
                              [*ROUTE_TARGET, "kind"], registry=registry)
        self.cost = Counter("distillgate_cost_dollars", "What the requests actually cost.",
                            ROUTE_TARGET, registry=registry)
        self.teacher_cost = Counter("distillgate_teacher_cost_dollars",
                                    "What the same requests would have cost on the teacher (all-teacher "
                                    "counterfactual).", ROUTE_TARGET, registry=registry)
        # A gauge: a cascaded request (student tried, teacher answered) saves a negative amount.
        self.savings = Gauge("distillgate_savings_dollars",
                             "All-teacher cost minus actual cost since this process started.",
                             ROUTE_TARGET, registry=registry)
        self.router_score = Histogram("distillgate_router_score", "The router's OOD score per request.",
                                      ["route"], buckets=SCORE_BUCKETS, registry=registry)
        self.fallbacks = Counter("distillgate_fallbacks", "Student failures served by the teacher instead.",
                                 ["route"], registry=registry)
        self.feedback = Counter("distillgate_feedback", "Feedback received (POST /v1/feedback), by who served the "
                                "answer and the rating given (none: a score or a correction alone).",
                                [*ROUTE_TARGET, "rating"], registry=registry)
        self._state = _StateCollector()
        registry.register(self._state)

    def bind(self, *, store: Any, routes: Any, writers: Iterable[Any] = (), shadow: Any = None,
             students: Any = None) -> None:
        """Give the scrape-time collector the live objects (built in the app's lifespan);
        ``students`` is the student's server pool (gateway/upstream/pool.py)."""
        self._state.bind(store=store, routes=routes, writers=list(writers), shadow=shadow, students=students)

    def bind_drift(self, drift: Any) -> None:
        """The training loop's DriftWatch."""
        self._state.drift = drift

    def bind_scheduler(self, scheduler: Any) -> None:
        """The training scheduler (None when retraining is not scheduled in this process)."""
        self._state.scheduler = scheduler

    def bind_rate_limiter(self, limiter: Any) -> None:
        """Where the per-key rate limits live (gateway/rate_limits.py)."""
        self._state.rate_limiter = limiter

    def bind_canaries(self, canaries: Any) -> None:
        """The training loop's CanaryRollouts."""
        self._state.canaries = canaries

    def bind_supervisor(self, supervisor: Any) -> None:
        """The vLLM supervisor (None when the gateway did not launch vLLM)."""
        self._state.supervisor = supervisor

    def observe(self, record: RequestRecord) -> None:
        """The ChatService observer: account for one finished request."""
        route, target, status = record.route, record.target or "none", str(record.status_code)
        self.requests.labels(route, target, status).inc()
        if record.status_code >= 400:
            self.errors.labels(route, target, status).inc()
        self.latency.labels(route, target).observe(time.perf_counter() - record.started)
        if record.upstream_latency_ms is not None:
            self.upstream_latency.labels(route, target).observe(record.upstream_latency_ms / 1000)
        self.tokens.labels(route, target, "prompt").inc(max(0, record.prompt_tokens))
        self.tokens.labels(route, target, "completion").inc(max(0, record.completion_tokens))
        self.cost.labels(route, target).inc(max(0.0, record.cost_usd))
        self.teacher_cost.labels(route, target).inc(max(0.0, record.teacher_cost_usd))
        self.savings.labels(route, target).inc(record.teacher_cost_usd - record.cost_usd)
        if record.router_score is not None:
            self.router_score.labels(route).observe(record.router_score)
        if record.fallback:
            self.fallbacks.labels(route).inc()

    def count_feedback(self, route: str, target: str, rating: str) -> None:
        self.feedback.labels(route, target, rating).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Metrics read at scrape time from the route table, the writers and the store."""

    def __init__(self) -> None:
        self._store: Any = None
        self._routes: Any = None
        self._writers: list[Any] = []
        self._shadow: Any = None
        self._students: Any = None
        self.supervisor: Any = None
        self.drift: Any = None
        self.scheduler: Any = None
        self.rate_limiter: Any = None
        self.canaries: Any = None
        self._lock = threading.Lock()
        self._shadow_last_id = 0
        self._shadow_totals: dict[tuple[str, str], list[int]] = {}

    def bind(self, *, store: Any, routes: Any, writers: list[Any], shadow: Any, students: Any = None) -> None:
        self._store, self._routes, self._writers, self._shadow = store, routes, writers, shadow
        self._students = students

    def describe(self) -> Iterable[Metric]:
        return []  # dynamic families: skip registration-time collection

    def collect(self) -> Iterator[Metric]:
        yield from self._route_families()
        yield from self._drift_families()
        yield from self._canary_families()
        yield from self._writer_families()
        yield from self._breaker_families()
        if self.scheduler is not None:
            leader = GaugeMetricFamily("distillgate_training_scheduler_leader",
                                       "1 when this replica schedules training (it holds the store's leader "
                                       "lock; one replica per PostgreSQL store), else 0.")
            leader.add_metric([], 1 if self.scheduler.leader else 0)
            yield leader
        yield from self._rate_limit_families()
        if self._store is not None:
            try:
                yield from self._shadow_families()
                yield from self._training_families()
            except STORE_ERRORS as error:  # a locked or broken store must not break the scrape
                logger.warning("metrics could not read the store", extra={"error": str(error)})

    def _route_families(self) -> Iterator[Metric]:
        if self._routes is None:
            return
        version = GaugeMetricFamily("distillgate_student_version_info",
                                    "The student version serving each route (version=none: teacher only).",
                                    labels=["route", "version"])
        threshold = GaugeMetricFamily("distillgate_route_ood_threshold", "The route's live OOD threshold.",
                                      labels=["route"])
        for state in self._routes:
            described = state.describe()
            version.add_metric([described["name"], described["student_version"] or "none"], 1)
            threshold.add_metric([described["name"]], described["ood_threshold"])
        yield version
        yield threshold

    def _drift_families(self) -> Iterator[Metric]:
        if self.drift is None or self._routes is None:
            return
        labels = ["route"]
        window = GaugeMetricFamily("distillgate_drift_window_requests",
                                   "Scored requests in the route's drift window (live version only).", labels=labels)
        ood = GaugeMetricFamily("distillgate_drift_ood_share",
                                "Share of the drift window above the route's live OOD threshold.", labels=labels)
        novel = GaugeMetricFamily("distillgate_drift_novel_share",
                                  "Share of the drift window above the 95th percentile of the live version's "
                                  "training scores (about 0.05 without drift).", labels=labels)
        retrains = CounterMetricFamily("distillgate_drift_retrains",
                                       "Training cycles started early because of drift.", labels=labels)
        for state in self._routes:
            route = state.config.name
            retrains.add_metric([route], self.drift.retrains[route])
            stats = self.drift.stats(route)
            if stats is None:
                continue
            window.add_metric([route], stats.requests)
            if stats.ood_share is not None:
                ood.add_metric([route], stats.ood_share)
            if stats.novel_share is not None:
                novel.add_metric([route], stats.novel_share)
        yield from (window, ood, novel, retrains)

    def _canary_families(self) -> Iterator[Metric]:
        if self.canaries is None or self._routes is None:
            return
        evidence = GaugeMetricFamily("distillgate_canary_evidence",
                                     "A running canary's evidence per arm (canary, live): answers served, shadow "
                                     "comparisons, agreements, feedback, negative feedback.",
                                     labels=["route", "version", "arm", "kind"])
        bounds = GaugeMetricFamily("distillgate_canary_agreement_bound",
                                   "The canary's Clopper-Pearson agreement bounds at its last look.",
                                   labels=["route", "version", "bound"])
        decisions = CounterMetricFamily("distillgate_canary_decisions",
                                        "Canaries ended, by action (promote, rollback, abandon, promotion_failed).",
                                        labels=["route", "action"])
        for (route, action), count in sorted(self.canaries.decisions.items()):
            decisions.add_metric([route, action], count)
        for state in self._routes:
            run = state.canary
            if run is None:
                continue
            for arm, version, values in (("canary", run.version, run.canary), ("live", run.live_version, run.live)):
                for kind in ("served", "compared", "agreed", "feedback", "negative_feedback"):
                    evidence.add_metric([state.config.name, version, arm, kind], getattr(values, kind))
            verdict = run.last_verdict
            if verdict is not None and verdict.canary_lower is not None:
                bounds.add_metric([state.config.name, run.version, "lower"], verdict.canary_lower)
                bounds.add_metric([state.config.name, run.version, "upper"], verdict.canary_upper)
        yield from (evidence, bounds, decisions)

    def _breaker_families(self) -> Iterator[Metric]:
        if self._students is None:
            return
        labels = ["server"]
        state = GaugeMetricFamily("distillgate_student_breaker_state",
                                  "Each student server's circuit breaker: 0 closed, 1 half-open, 2 open.", labels=labels)
        opened = CounterMetricFamily("distillgate_student_breaker_opened", "Times the server's breaker opened.",
                                     labels=labels)
        sent = CounterMetricFamily("distillgate_student_server_requests",
                                   "Requests tried on each student server (the balance; a refused connection, then "
                                   "retried on another server, counts for both).", labels=labels)
        outstanding = GaugeMetricFamily("distillgate_student_server_outstanding",
                                        "Requests to each student server not yet answered.", labels=labels)
        for server in self._students.servers:
            state.add_metric([server.url], int(server.breaker.state))
            opened.add_metric([server.url], server.breaker.opened_total)
            sent.add_metric([server.url], server.requests)
            outstanding.add_metric([server.url], server.outstanding)
        yield from (state, opened, sent, outstanding)
        if self.supervisor is not None:
            up = GaugeMetricFamily("distillgate_student_server_up",
                                   "1 while the supervised vLLM server is ready (adapters reloaded).")
            up.add_metric([], 1 if self.supervisor.up else 0)
            restarts = CounterMetricFamily("distillgate_student_server_restarts",
                                           "Times the supervised vLLM server was restarted.")
            restarts.add_metric([], self.supervisor.restarts)
            yield from (up, restarts)

    def _rate_limit_families(self) -> Iterator[Metric]:
        if self.rate_limiter is None:
            return
        errors = CounterMetricFamily("distillgate_rate_limit_storage_errors",
                                     "Failed calls to the shared rate-limit storage (Redis).", labels=["storage"])
        errors.add_metric([self.rate_limiter.storage], self.rate_limiter.storage_errors)
        unchecked = CounterMetricFamily("distillgate_rate_limit_unchecked",
                                        "Rate-limited requests decided without the storage (it was unreachable): "
                                        "allowed (fail open) or refused (fail closed).", labels=["outcome"])
        for outcome in ("allowed", "refused"):
            unchecked.add_metric([outcome], self.rate_limiter.unchecked[outcome])
        yield from (errors, unchecked)

    def _writer_families(self) -> Iterator[Metric]:
        pending = GaugeMetricFamily("distillgate_store_pending_rows", "Rows queued for the store.", labels=["writer"])
        written = CounterMetricFamily("distillgate_store_rows_written", "Rows written to the store.", labels=["writer"])
        errors = CounterMetricFamily("distillgate_store_write_errors", "Failed store writes (each retried).",
                                     labels=["writer"])
        healthy = GaugeMetricFamily("distillgate_store_writer_healthy", "1 when the writer's last write succeeded.",
                                    labels=["writer"])
        spool_errors = CounterMetricFamily("distillgate_store_spool_append_errors",
                                           "Rows the write-ahead spool could not take (kept in memory only).",
                                           labels=["writer"])
        alive = GaugeMetricFamily("distillgate_store_writer_alive", "1 while the writer's task runs.",
                                  labels=["writer"])
        restarts = CounterMetricFamily("distillgate_store_writer_restarts", "Times the writer's task died and was "
                                       "restarted.", labels=["writer"])
        dead = CounterMetricFamily("distillgate_store_dead_letter_rows", "Poison rows set aside in the dead-letter "
                                   "file.", labels=["writer"])
        for writer in self._writers:
            alive.add_metric([writer.name], 1 if writer.alive else 0)
            restarts.add_metric([writer.name], writer.restarts)
            dead.add_metric([writer.name], writer.dead_letter_rows)
            if getattr(writer, "spool", None) is not None:
                spool_errors.add_metric([writer.name], writer.spool.append_errors)
            pending.add_metric([writer.name], writer.pending)
            written.add_metric([writer.name], writer.rows_written)
            errors.add_metric([writer.name], writer.write_errors)
            healthy.add_metric([writer.name], 1 if writer.healthy else 0)
        yield from (pending, written, errors, healthy, spool_errors, alive, restarts, dead)
        if self._shadow is not None:
            skipped = CounterMetricFamily("distillgate_shadow_skipped", "Shadow samples skipped (queue full).")
            skipped.add_metric([], self._shadow.skipped)
            failed = CounterMetricFamily("distillgate_shadow_failed", "Shadow calls that failed.")
            failed.add_metric([], self._shadow.failed)
            yield from (skipped, failed)

    def _shadow_families(self) -> Iterator[Metric]:
        with self._lock:
            for row in reporting.shadow_tally_since(self._store, self._shadow_last_id):
                totals = self._shadow_totals.setdefault((row["route"], row["student_version"]), [0, 0])
                totals[0] += row["comparisons"]
                totals[1] += row["agreements"]
                self._shadow_last_id = max(self._shadow_last_id, row["last_id"])
            snapshot = dict(self._shadow_totals)
        comparisons = CounterMetricFamily("distillgate_shadow_comparisons",
                                          "Shadow comparisons of student and teacher answers (from the store).",
                                          labels=["route", "student_version"])
        agreements = CounterMetricFamily("distillgate_shadow_agreements",
                                         "Shadow comparisons where the student agreed with the teacher.",
                                         labels=["route", "student_version"])
        for (route, version), (total, agreed) in sorted(snapshot.items()):
            comparisons.add_metric([route, version], total)
            agreements.add_metric([route, version], agreed)
        yield from (comparisons, agreements)

    def _training_families(self) -> Iterator[Metric]:
        runs = CounterMetricFamily("distillgate_training_runs", "Training runs by outcome (from the store).",
                                   labels=["route", "outcome"])
        last = GaugeMetricFamily("distillgate_training_last_finished_timestamp_seconds",
                                 "When the route's last training run finished.", labels=["route"])
        latest: dict[str, float] = {}
        for row in reporting.training_tally(self._store):
            runs.add_metric([row["route"], row["outcome"]], row["runs"])
            if row["last_finished"] is not None:
                latest[row["route"]] = max(latest.get(row["route"], 0.0), row["last_finished"])
        for route, finished in sorted(latest.items()):
            last.add_metric([route], finished)
        yield from (runs, last)


# -- GET /metrics ----------------------------------------------------------------------------
endpoints = APIRouter()


def scrape_token_from_env() -> str | None:
    return os.environ.get(METRICS_TOKEN_ENV) or None


def require_scraper(request: Request) -> None:
    """Open when no scrape token is configured; else the scrape token or the admin token."""
    metrics: GatewayMetrics = request.app.state.metrics
    if metrics.scrape_token is None:
        return
    accepted = [metrics.scrape_token, *([request.app.state.admin_token] if request.app.state.admin_token else [])]
    token = bearer_token(request)
    if token is None or not constant_time_in(token, accepted):
        raise AuthenticationFailed(f"/metrics requires the scrape token ({METRICS_TOKEN_ENV}) as a bearer.")


@endpoints.get("/metrics", dependencies=[Depends(require_scraper)], include_in_schema=False)
async def metrics_endpoint(request: Request) -> Response:
    metrics: GatewayMetrics = request.app.state.metrics
    # Collectors read the store: off the event loop so a scrape never stalls requests.
    body = await asyncio.to_thread(metrics.exposition)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
