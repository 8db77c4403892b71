"""Tracing: each chat request is one trace under FastAPI's server span, with the gateway's own
spans (router decision, student call, cascade check, teacher call, log write) carrying route,
target, version and scores; with no endpoint configured nothing is installed at all.

Each app gets its own tracer provider (an in-memory exporter), never the process-wide one."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from core.config import Settings, TracingConfig
from gateway.app import Components, create_app
from gateway.tracing import Tracing, setup_tracing, traces_url
from gateway.upstream.student import VLLMStudent
from router.decision import Decision, RoutePolicy
from tests.helpers import ROOT, UTTERANCE, UvicornThread, completion_with_logprob, sdk

THRESHOLD = -0.5


class CascadeRouter:
    async def decide(self, policy: RoutePolicy, messages: list[dict[str, Any]]) -> Decision:
        return Decision("student", score=0.125, reasons=["test", "in distribution"], cascade=True)


def student_answer(request: httpx.Request) -> httpx.Response:
    """Sure of itself unless the prompt says "unsure" (then its logprob is under THRESHOLD)."""
    if request.url.path != "/v1/chat/completions":
        return httpx.Response(200, json={})  # the gateway's own calls (adapter unloads at shutdown)
    body = json.loads(request.content)
    logprob = -2.0 if "unsure" in body["messages"][-1]["content"] else -0.01
    return completion_with_logprob(body["model"], logprob)


def cascade_settings(make_settings: Callable[..., Settings], replay_teacher: str) -> Settings:
    return make_settings(replay_teacher, route={"confidence_threshold": THRESHOLD,
                                                "student": {"serve_base_model": True}})


def traces(exporter: InMemorySpanExporter) -> dict[str, list[ReadableSpan]]:
    """Each request's finished spans by its id (read off the trace's log.write span), in start order."""
    by_trace: dict[int, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        by_trace.setdefault(span.context.trace_id, []).append(span)
    found = {}
    for spans in by_trace.values():
        log_writes = [span for span in spans if span.name == "log.write"]
        if not log_writes:
            continue  # not a request's trace: the gateway's own calls to the student
        [log_write] = log_writes
        found[log_write.attributes["distillgate.request_id"]] = sorted(spans, key=lambda span: span.start_time)
    return found


def gateway_spans(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    """The request's server span (FastAPI's) and the gateway's own spans, by name; each of
    the gateway's spans is a direct child of the server span."""
    [server] = [span for span in spans if span.kind == SpanKind.SERVER]
    assert server.name == "POST /v1/chat/completions"
    assert server.parent is None
    ours = {span.name: span for span in spans if span.name.count(".") == 1 and span.kind == SpanKind.INTERNAL}
    assert len(ours) == len([span for span in spans if span.name in ours])  # each at most once
    for span in ours.values():
        assert span.parent is not None and span.parent.span_id == server.context.span_id, span.name
    return {"server": server, **ours}


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return {key.removeprefix("distillgate."): value for key, value in (span.attributes or {}).items()
            if key.startswith("distillgate.")}


def test_a_cascade_request_is_one_trace_with_the_gateway_spans(make_settings: Callable[..., Settings],
                                                                replay_teacher: str) -> None:
    settings = cascade_settings(make_settings, replay_teacher)
    exporter = InMemorySpanExporter()
    tracing = setup_tracing(settings.tracing, exporter=exporter)
    student = VLLMStudent("http://student.invalid", transport=httpx.MockTransport(student_answer))
    app = create_app(settings, Components(student=student, router=CascadeRouter(), tracing=tracing))
    with UvicornThread(app) as server:
        client = sdk(server.url)
        served = client.chat.completions.with_raw_response.create(
            model="clinc-intents", messages=[{"role": "user", "content": "sure thing"}])
        unsure = client.chat.completions.with_raw_response.create(
            model="clinc-intents", messages=[{"role": "user", "content": f"unsure {UTTERANCE}"}])
        assert httpx.get(f"{server.url}/healthz").status_code == 200  # a probe: not traced
    assert (served.headers["x-distillgate-target"], unsure.headers["x-distillgate-target"]) == ("student", "teacher")
    version = served.headers["x-distillgate-student-version"]
    assert version != "none"
    found = traces(exporter)
    assert set(found) == {served.headers["x-request-id"], unsure.headers["x-request-id"]}
    assert [span.name for span in exporter.get_finished_spans() if span.kind == SpanKind.SERVER] == [
        "POST /v1/chat/completions"] * 2

    # The student served: its call, a passed cascade check, no teacher call.
    request_id = served.headers["x-request-id"]
    spans = gateway_spans(found[request_id])
    assert [name for name in spans if name != "server"] == ["router.decide", "student.call", "cascade.check",
                                                           "log.write"]
    common = {"route": "clinc-intents", "request_id": request_id}
    assert attributes(spans["router.decide"]) == {**common, "target": "student", "ood_score": 0.125,
                                                  "reason_count": 2, "cascade": True}
    student_call = attributes(spans["student.call"])
    assert student_call.pop("adapter")  # the served model's name, which the mock student does not check
    assert student_call == {**common, "student_version": version}
    check = attributes(spans["cascade.check"])
    assert check["cascade_passed"] is True and check["cascade_threshold"] == THRESHOLD
    assert check["cascade_score"] >= THRESHOLD
    assert attributes(spans["log.write"]) == {**common, "target": "student", "student_version": version,
                                              "status_code": 200}
    # httpx's client span for the student's HTTP call sits under student.call.
    [http_call] = [span for span in found[request_id] if span.kind == SpanKind.CLIENT]
    assert http_call.parent is not None and http_call.parent.span_id == spans["student.call"].context.span_id
    assert http_call.attributes is not None and "student.invalid" in str(http_call.attributes.values())

    # The student was unsure: the cascade check failed and the teacher answered.
    request_id = unsure.headers["x-request-id"]
    spans = gateway_spans(found[request_id])
    assert [name for name in spans if name != "server"] == ["router.decide", "student.call", "cascade.check",
                                                           "teacher.call", "log.write"]
    common = {"route": "clinc-intents", "request_id": request_id}
    check = attributes(spans["cascade.check"])
    assert check["cascade_passed"] is False and check["cascade_score"] < THRESHOLD
    assert attributes(spans["teacher.call"]) == {**common, "target": "teacher", "student_version": version,
                                                 "teacher_model": "openai/replay-teacher"}
    assert attributes(spans["log.write"])["target"] == "teacher"
    assert all(span.status.status_code != StatusCode.ERROR for span in found[request_id])
    assert {span.resource.attributes["service.name"] for span in exporter.get_finished_spans()} == {"distillgate"}


def test_a_streamed_request_is_traced_up_to_its_log_write(make_settings: Callable[..., Settings],
                                                          replay_teacher: str) -> None:
    settings = cascade_settings(make_settings, replay_teacher)
    exporter = InMemorySpanExporter()
    student = VLLMStudent("http://student.invalid", transport=httpx.MockTransport(student_answer))
    app = create_app(settings, Components(student=student, router=CascadeRouter(),
                                          tracing=setup_tracing(settings.tracing, exporter=exporter)))
    with UvicornThread(app) as server, sdk(server.url).chat.completions.with_streaming_response.create(
            model="clinc-intents", messages=[{"role": "user", "content": f"unsure {UTTERANCE}"}],
            stream=True) as response:
        text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices)
        request_id, target = response.headers["x-request-id"], response.headers["x-distillgate-target"]
    assert target == "teacher" and text and text != "student-answer"
    spans = gateway_spans(traces(exporter)[request_id])
    assert [name for name in spans if name != "server"] == ["router.decide", "student.call", "cascade.check",
                                                           "teacher.call", "log.write"]
    assert attributes(spans["teacher.call"])["stream"] is True
    assert attributes(spans["log.write"])["stream"] is True
    assert attributes(spans["log.write"])["target"] == "teacher"


class StudentRouter:
    async def decide(self, policy: RoutePolicy, messages: list[dict[str, Any]]) -> Decision:
        return Decision("student", score=0.0, reasons=["test"])


def streamed_student_answer(request: httpx.Request) -> httpx.Response:
    if request.url.path != "/v1/chat/completions":
        return httpx.Response(200, json={})
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": "student-answer"},
                            "finish_reason": "stop"}]},
              {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}]
    text = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
    return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


def test_a_streamed_student_answer_is_traced(make_settings: Callable[..., Settings], replay_teacher: str) -> None:
    settings = make_settings(replay_teacher, route={"student": {"serve_base_model": True}})
    exporter = InMemorySpanExporter()
    student = VLLMStudent("http://student.invalid", transport=httpx.MockTransport(streamed_student_answer))
    app = create_app(settings, Components(student=student, router=StudentRouter(),
                                          tracing=setup_tracing(settings.tracing, exporter=exporter)))
    with UvicornThread(app) as server, sdk(server.url).chat.completions.with_streaming_response.create(
            model="clinc-intents", messages=[{"role": "user", "content": UTTERANCE}], stream=True) as response:
        text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices)
        request_id = response.headers["x-request-id"]
    assert text == "student-answer"
    found = traces(exporter)[request_id]
    spans = gateway_spans(found)
    assert [name for name in spans if name != "server"] == ["router.decide", "student.call", "log.write"]
    assert attributes(spans["student.call"])["stream"] is True
    assert attributes(spans["log.write"])["target"] == "student"
    [http_call] = [span for span in found if span.kind == SpanKind.CLIENT]
    assert http_call.parent is not None and http_call.parent.span_id == spans["student.call"].context.span_id


def test_a_failed_student_call_is_an_error_span(make_settings: Callable[..., Settings], replay_teacher: str) -> None:
    settings = cascade_settings(make_settings, replay_teacher)
    exporter = InMemorySpanExporter()
    student = VLLMStudent("http://student.invalid", transport=httpx.MockTransport(lambda request: httpx.Response(500)))
    app = create_app(settings, Components(student=student, router=CascadeRouter(),
                                          tracing=setup_tracing(settings.tracing, exporter=exporter)))
    with UvicornThread(app) as server:
        response = sdk(server.url).chat.completions.with_raw_response.create(
            model="clinc-intents", messages=[{"role": "user", "content": UTTERANCE}])
    assert response.headers["x-distillgate-target"] == "teacher"
    spans = gateway_spans(traces(exporter)[response.headers["x-request-id"]])
    assert "cascade.check" not in spans
    assert spans["student.call"].status.status_code == StatusCode.ERROR
    assert spans["teacher.call"].status.status_code != StatusCode.ERROR


def test_tracing_off_installs_nothing_and_records_nothing(make_settings: Callable[..., Settings],
                                                          replay_teacher: str) -> None:
    settings = cascade_settings(make_settings, replay_teacher)
    global_provider = trace.get_tracer_provider()
    student = VLLMStudent("http://student.invalid", transport=httpx.MockTransport(student_answer))
    app = create_app(settings, Components(student=student, router=CascadeRouter()))
    with UvicornThread(app) as server:
        response = sdk(server.url).chat.completions.with_raw_response.create(
            model="clinc-intents", messages=[{"role": "user", "content": f"unsure {UTTERANCE}"}])
        tracing: Tracing = app.state.tracing
        assert app.state.chat_service.tracing is tracing
    assert response.headers["x-distillgate-target"] == "teacher"
    assert not tracing.enabled and tracing.provider is None
    assert not getattr(app, "_is_instrumented_by_opentelemetry", False)
    assert not getattr(student.http_client, "_is_instrumented_by_opentelemetry", False)
    assert trace.get_tracer_provider() is global_provider  # the API's proxy: library spans are no-ops
    with tracing.span("router.decide", route="r") as span, tracing.span("log.write") as inner:
        assert not span.is_recording() and not inner.is_recording()
        Tracing.set(span, target="student")


def test_tracing_off_never_imports_the_sdk() -> None:
    """The off path costs no import: building an app does not load OpenTelemetry's SDK."""
    code = ("import sys; from core.config import parse_settings; from gateway.app import create_app; "
            "create_app(parse_settings({'routes': [{'name': 'r', 'teacher': {'model': 'openai/x'}}]})); "
            "print(sorted(name for name in sys.modules if name.startswith('opentelemetry.sdk')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}, check=True)
    assert result.stdout.strip() == "[]"


def test_an_endpoint_turns_on_otlp_export(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not setup_tracing(TracingConfig()).enabled
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector.invalid:4318/")
    tracing = setup_tracing(TracingConfig(service_name="gw-1"))
    try:
        assert tracing.enabled and tracing.provider is not None
        [processor] = tracing.provider._active_span_processor._span_processors  # the SDK keeps no public list
        assert isinstance(processor, BatchSpanProcessor)
        assert tracing.provider.resource.attributes["service.name"] == "gw-1"
    finally:
        tracing.shutdown()  # nothing was recorded: nothing is sent
    assert traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"


def test_sample_ratio_zero_records_nothing() -> None:
    exporter = InMemorySpanExporter()
    tracing = setup_tracing(TracingConfig(sample_ratio=0.0), exporter=exporter)
    with tracing.span("router.decide", route="r") as span:
        assert not span.is_recording()
    assert exporter.get_finished_spans() == ()
    sampled = setup_tracing(TracingConfig(), exporter=exporter)
    with sampled.span("router.decide", route="r", ood_score=None):
        pass
    [span] = exporter.get_finished_spans()
    assert dict(span.attributes or {}) == {"distillgate.route": "r"}  # None is left out
