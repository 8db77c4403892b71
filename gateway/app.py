"""The app factory: every live object is built in the lifespan and kept on ``app.state``.

Nothing heavy happens at import: no clients, no models, no torch. Tests build an app with
``create_app(settings, components=...)`` to swap in their own upstreams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from core.config import Settings
from core.store import STORE_ERRORS, BatchWriter, Store, open_store
from core.store.spool import Spool
from core.store.writer import DeadLetter, write_isolating
from core.upstream import StudentBackend, TeacherClient
from gateway.admin.endpoints import endpoints as admin_endpoints
from gateway.budgets import KeyBudgets
from gateway.chat.endpoints import endpoints as chat_endpoints
from gateway.chat.service import ChatService, Observer
from gateway.dashboard import sessions as dashboard_sessions
from gateway.dashboard.endpoints import endpoints as dashboard_endpoints
from gateway.error_handlers import install_error_handlers
from gateway.feedback.endpoints import endpoints as feedback_endpoints
from gateway.feedback.service import FeedbackService
from gateway.health import endpoints as health_endpoints
from gateway.keys import KeyPolicies, key_names
from gateway.limits import BodyLimits
from gateway.messages.endpoints import endpoints as messages_endpoints
from gateway.messages.errors import anthropic_error_response
from gateway.metrics import GatewayMetrics, scrape_token_from_env
from gateway.metrics import endpoints as metrics_endpoints
from gateway.models_api import endpoints as models_endpoints
from gateway.passthrough.endpoints import endpoints as passthrough_endpoints
from gateway.passthrough.service import PassthroughService
from gateway.rate_limits import build_rate_limiter
from gateway.responses.endpoints import endpoints as responses_endpoints
from gateway.retention import RetentionTask
from gateway.route_table import RouteTable
from gateway.shadow import ShadowRunner
from gateway.tracing import Tracing, setup_tracing
from gateway.training import TrainingLoop
from gateway.upstream.pool import StudentPool, build_student_pool
from router.decision import PolicyRouter, Router

if TYPE_CHECKING:
    from gateway.upstream.teacher_base import TeacherBase

logger = logging.getLogger(__name__)


@dataclass
class Components:
    """Overrides for the live objects; anything left None is built from the settings."""

    store: Store | None = None
    student: StudentBackend | None = None
    teachers: dict[str, TeacherClient] | None = None
    router: Router | None = None
    observers: list[Observer] = field(default_factory=list)
    # The config file the app was built from; scheduled retraining runs only when it is known.
    config_path: Path | None = None
    extra_startup: list[Callable[[FastAPI], Any]] = field(default_factory=list)
    # The vLLM child that ``serve`` launched (a VLLMProcess): supervised, restarted when it dies.
    vllm_process: Any = None
    # Tests pass one with an in-memory exporter; the app shuts down only a Tracing it built.
    tracing: Tracing | None = None


def _build_teachers(settings: Settings) -> dict[str, TeacherBase]:
    """Per route, plain httpx for an OpenAI-compatible teacher, else litellm (``teacher.client``)."""
    from gateway.upstream.openai_teacher import OpenAITeacher
    from gateway.upstream.teacher import LiteLLMTeacher

    teachers: dict[str, TeacherBase] = {}
    for route in settings.routes:
        kind = OpenAITeacher if route.teacher.resolved_client() == "httpx" else LiteLLMTeacher
        teachers[route.name] = kind(route.teacher)
    return teachers


def _student_pool(settings: Settings, student: StudentBackend | None) -> StudentPool:
    """The student's servers behind one pool: ``vllm.urls`` (or ``url``), or the test's backend."""
    vllm = settings.vllm
    if student is None:
        return build_student_pool(vllm.server_urls, vllm.breaker, vllm.served_model_name, vllm.max_model_len)
    if isinstance(student, StudentPool):
        return student
    return StudentPool([(getattr(student, "base_url", "student"), student)], vllm.breaker, vllm.served_model_name)


def _build_router(settings: Settings, store: Store) -> Router:
    """The OOD router when the router's extra is installed, else mode rules only."""
    try:
        from router.ood_router import build_ood_router
    except ImportError:
        logger.warning("router extra not installed: routing by mode and cold start only")
        return PolicyRouter()
    return build_ood_router(settings, store)


def _build_supervisor(settings: Settings, components: Components, training: TrainingLoop) -> Any:
    """A supervisor for the vLLM child ``serve`` launched, or None (vLLM runs elsewhere)."""
    if components.vllm_process is None or not settings.vllm.supervise.enabled:
        return None
    from gateway.vllm_supervisor import VLLMSupervisor

    return VLLMSupervisor(components.vllm_process, settings.vllm.supervise, on_ready=training.restore_now)


async def _recovered_spool(settings: Settings, store: Store) -> Spool | None:
    """The request log's spool, after replaying what a crashed run left in it."""
    config = settings.store.spool
    if not config.enabled:
        return None
    spool = Spool(settings.store.spool_dir(), fsync=config.fsync, segment_bytes=int(config.segment_mb * (1 << 20)))
    dead_letter = DeadLetter(settings.store.dead_letter_file())
    try:
        await asyncio.to_thread(spool.recover, partial(write_isolating, store.insert_requests, dead_letter=dead_letter))
    except STORE_ERRORS as error:  # segments are kept and replayed at the next start
        logger.error("spool recovery failed", extra={"error": str(error), "spool": str(spool.directory)})
    return spool


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Build the live objects; each is closed on the way out, in reverse order of start, also
    when a later one fails to start (the exit stack unwinds only what was started)."""
    settings: Settings = app.state.settings
    components: Components = app.state.components
    async with contextlib.AsyncExitStack() as stack:
        tracing: Tracing = app.state.tracing
        if components.tracing is None:
            stack.callback(tracing.shutdown)  # last out: flushes the spans of the shutdown too
        store = components.store
        if store is None:
            spool_config = settings.store.spool
            store = await asyncio.to_thread(open_store, settings.store,
                                            durable_commits=spool_config.enabled and spool_config.fsync)
            stack.callback(store.close)
        writer = await _start_writer(stack, settings, store)
        stack.push_async_callback(app.state.key_policies.limiter.aclose)
        # After the spool's replay, so that rows a crash left behind count toward budgets.
        budgets: KeyBudgets = app.state.budgets
        await asyncio.to_thread(budgets.seed, store)
        shadow_writer = BatchWriter(store.insert_shadow_results, name="shadow_results",
                                    dead_letter_path=settings.store.dead_letter_file())
        shadow_writer.start()
        stack.push_async_callback(shadow_writer.close)
        student = _student_pool(settings, components.student)
        stack.push_async_callback(student.aclose)
        for _url, client in student.members():
            tracing.instrument_client(getattr(client, "http_client", None))
        teachers = components.teachers
        if not teachers:
            teachers = built = _build_teachers(settings)
            for teacher in built.values():
                tracing.instrument_client(getattr(teacher, "http_client", None))
                stack.push_async_callback(teacher.aclose)
        routes = RouteTable(settings, store)
        router = components.router or _build_router(settings, store)
        if components.router is None and hasattr(router, "close"):
            stack.callback(router.close)
        shadow = ShadowRunner(student, teachers, shadow_writer)
        shadow.start()
        stack.push_async_callback(shadow.close)
        student.start()  # each server's breaker probe
        stack.push_async_callback(student.close)
        app.state.store, app.state.writer, app.state.routes = store, writer, routes
        app.state.student, app.state.decider, app.state.shadow = student, router, shadow
        metrics: GatewayMetrics = app.state.metrics
        metrics.bind(store=store, routes=routes, writers=[writer, shadow_writer], shadow=shadow, students=student)
        trusted_for_training = app.state.key_policies.trusted_for_training
        training = TrainingLoop(settings, store, student, routes, router, components.config_path)
        app.state.training, app.state.swapper = training, training.swapper
        student.adapters = training.swapper  # what a returning server is given before it takes traffic
        app.state.feedback = FeedbackService(store, routes, metrics.count_feedback, trusted_for_training)
        # The canary rollout's evidence: what each arm served, its shadow comparisons, its feedback.
        shadow.observers.append(training.canaries.observe_shadow)
        app.state.feedback.observers.append(training.canaries.observe_feedback)
        observers = [*components.observers, metrics.observe, budgets.observe, app.state.feedback.remember,
                     training.canaries.observe_request]
        app.state.chat_service = ChatService(routes, router, student, teachers, writer, shadow, observers,
                                             trusted_for_training=trusted_for_training,
                                             request_timeout_s=settings.server.request_timeout_s, budgets=budgets,
                                             tracing=tracing)
        app.state.passthrough_service = PassthroughService(routes, writer, observers, budgets=budgets)
        supervisor = _build_supervisor(settings, components, training)
        app.state.vllm_supervisor = supervisor
        metrics.bind_supervisor(supervisor)
        metrics.bind_drift(training.drift)
        metrics.bind_scheduler(training.scheduler)
        metrics.bind_canaries(training.canaries)
        training.start(restore=supervisor is None)
        stack.push_async_callback(training.stop)
        if supervisor is not None:
            supervisor.start()
            stack.push_async_callback(supervisor.close)
        retention = RetentionTask(store, settings.store)
        retention.start()
        stack.push_async_callback(retention.stop)
        for startup in components.extra_startup:
            await startup(app)
        logger.info("gateway ready", extra={"routes": [route.name for route in settings.routes]})
        yield
        logger.info("gateway stopping", extra={"rows_written": writer.rows_written})


async def _start_writer(stack: contextlib.AsyncExitStack, settings: Settings, store: Store) -> BatchWriter:
    """The request log's batched writer, after the spool's replay; flushed last on the way out."""
    spool = await _recovered_spool(settings, store)
    writer = BatchWriter(store.insert_requests, batch_size=settings.store.batch_size,
                         flush_interval_s=settings.store.flush_interval_s, queue_max=settings.store.queue_max,
                         spool=spool, dead_letter_path=settings.store.dead_letter_file())
    writer.start()
    stack.push_async_callback(writer.close)
    return writer


def create_app(settings: Settings, components: Components | None = None) -> FastAPI:
    app = FastAPI(title="distillgate", version="0.1.0", lifespan=_lifespan,
                  description="OpenAI-compatible gateway with online distillation.")
    app.state.settings = settings
    app.state.components = components or Components()
    app.state.key_policies = KeyPolicies(settings.auth, build_rate_limiter(settings.rate_limit))
    app.state.budgets = KeyBudgets(settings.auth)
    app.state.key_names = key_names(settings.auth)  # key id -> key_env, for the dashboard
    app.state.client_keys = settings.auth.client_keys() + app.state.key_policies.keys
    # Keys configured under auth.keys close the surface even when none of them is set.
    app.state.auth_required = bool(app.state.client_keys or settings.auth.keys)
    app.state.admin_token = settings.admin_token()
    app.state.sessions, app.state.sign_in_limiter = dashboard_sessions.build(settings.auth)
    app.state.started_at = int(time.time())
    app.state.metrics = GatewayMetrics(scrape_token=scrape_token_from_env())
    app.state.metrics.bind_rate_limiter(app.state.key_policies.limiter)
    app.state.error_envelopes = {"/v1/messages": anthropic_error_response}
    install_error_handlers(app)
    app.state.tracing = app.state.components.tracing or setup_tracing(settings.tracing)
    # The server span wraps the whole middleware stack (body limits and error handlers included).
    app.state.tracing.instrument_app(app)
    # Every route's body is bounded in size and arrival time, the dashboard's sign-in included.
    app.add_middleware(BodyLimits, max_body_bytes=settings.server.max_body_bytes,
                       body_timeout_s=settings.server.body_timeout_s)
    for endpoints in (chat_endpoints, responses_endpoints, messages_endpoints, passthrough_endpoints, feedback_endpoints,
                      models_endpoints, health_endpoints, admin_endpoints, metrics_endpoints, dashboard_endpoints):
        app.include_router(endpoints)
    return app
