"""OpenTelemetry traces of the request path: FastAPI's server span, the student's httpx calls,
and the service's own spans (``router.decide``, ``student.call``, ``cascade.check``,
``teacher.call``, ``log.write``).

A ``Tracing`` holds its own tracer provider and is handed to what needs it (the app, the chat
service): nothing here sets OpenTelemetry's process-wide provider, so two apps in one process
(tests) never see each other's spans. Off (no endpoint, no exporter) it holds no provider,
instruments nothing, and ``span()`` returns one shared no-op context: the request path pays a
method call per span, and the SDK is never imported.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from core.config import TracingConfig

if TYPE_CHECKING:
    import httpx
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

logger = logging.getLogger(__name__)

# Every attribute the service sets is namespaced; ``span(name, route=...)`` sets ``distillgate.route``.
PREFIX = "distillgate."
# Probes and scrapes arrive every few seconds and say nothing about a request: no traces for them.
EXCLUDED_URLS = "/healthz,/readyz,/metrics"
# The API's invalid span accepts and drops attributes, events and status; ``nullcontext`` is
# stateless, so one instance serves every span of a gateway with tracing off.
_OFF: contextlib.nullcontext[trace.Span] = contextlib.nullcontext(trace.INVALID_SPAN)


class Tracing:
    """Spans for one app; ``Tracing()`` is tracing off."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("distillgate") if provider is not None else None

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def span(self, name: str, **attributes: Any) -> contextlib.AbstractContextManager[trace.Span]:
        """A child of the current span, current while the ``with`` block runs; an exception
        leaving the block is recorded on it. Attributes that are None are left out (OTel
        refuses them)."""
        if self._tracer is None:
            return _OFF
        return self._tracer.start_as_current_span(
            name, attributes={PREFIX + key: value for key, value in attributes.items() if value is not None})

    @staticmethod
    def set(span: trace.Span, **attributes: Any) -> None:
        """Attributes known only once the span's work is done (the decision, the score)."""
        if span.is_recording():
            span.set_attributes({PREFIX + key: value for key, value in attributes.items() if value is not None})

    def instrument_app(self, app: FastAPI) -> None:
        """FastAPI's server spans: the root of each request's trace (or a child of the caller's)."""
        if self.provider is None:
            return
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app, tracer_provider=self.provider, excluded_urls=EXCLUDED_URLS)

    def instrument_client(self, client: httpx.AsyncClient | None) -> None:
        """Client spans for one httpx client (the student's, an OpenAI-compatible teacher's).
        Per client rather than httpx's global patch: that one is process-wide, and it skips a
        client built with its own transport (the tests' mock student). A litellm teacher calls
        through litellm's own aiohttp transport, which this cannot see: ``teacher.call`` times it."""
        if self.provider is None or client is None:
            return
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        HTTPXClientInstrumentor.instrument_client(client, tracer_provider=self.provider)

    def shutdown(self) -> None:
        """Export what is still batched, then stop (the app's lifespan ends with this)."""
        if self.provider is not None:
            self.provider.shutdown()


def setup_tracing(config: TracingConfig, exporter: SpanExporter | None = None) -> Tracing:
    """Tracing from the config: off unless an OTLP endpoint is configured (or ``exporter`` is
    given: tests pass an in-memory one, exported synchronously)."""
    endpoint = config.endpoint()
    if endpoint is None and exporter is None:
        return Tracing()
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: config.service_name}),
                              sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        assert endpoint is not None
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # Batched: the request path only appends to a queue; a background thread exports.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint))))
        logger.info("tracing on", extra={"otlp_endpoint": endpoint, "sample_ratio": config.sample_ratio})
    return Tracing(provider)


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL for a collector's base URL (as OTEL_EXPORTER_OTLP_ENDPOINT means it)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"

