"""Serving one chat completion: decide, call the student or the teacher, fall back, log.

The client never sees a student failure: any student error, timeout or low-confidence
answer (cascade) is served by the teacher instead. Teacher failures, after the teacher
client's own retries, become 502/504 in OpenAI's error format; a teacher's 429 stays a 429
with its ``retry-after``, a teacher at its concurrency limit is a 503 with ``retry-after``.
Each request has an overall deadline (``server.request_timeout_s``, streams included): past
it the client gets a 504, or for a stream already under way an error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from core.prompting import student_request
from core.store import BatchWriter
from core.tool_calls import tool_names
from core.upstream import Completion, StudentBackend, TeacherClient, UpstreamFailure
from gateway import deadline
from gateway.chat import shapes
from gateway.chat.protocol import ChatCompletionRequest
from gateway.chat.record import RequestRecord, estimate_tokens
from gateway.chat.stream_format import ChatStreamFormat, StreamFormat, ToolCallAccumulator
from gateway.errors import (
    GatewayError,
    RateLimited,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.redact import Redactor
from gateway.route_table import RouteState, RouteTable
from gateway.upstream.breaker import StudentBreaker
from router.decision import Decision, Router

logger = logging.getLogger(__name__)

Observer = Callable[[RequestRecord], None]


@dataclass
class Served:
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class StreamStart:
    headers: dict[str, str]
    events: AsyncIterator[bytes]


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


def teacher_error(failure: UpstreamFailure) -> GatewayError:
    """The client's error for a teacher failure. A provider's 429 is passed on as a 429 with
    its retry-after (the client should slow down, not treat the gateway as broken)."""
    if failure.timeout:
        return UpstreamTimeout("The teacher model timed out.")
    wait = {"retry-after": str(max(1, math.ceil(failure.retry_after_s or 1)))}
    if failure.status_code == 429:
        return RateLimited("The teacher model is rate limited; retry after the time in the retry-after header.",
                           headers=wait)
    if failure.status_code == 503 and failure.retry_after_s is not None:
        return Unavailable(f"The teacher model is at capacity: {failure}", headers=wait)
    return UpstreamError(f"The teacher model failed: {failure}")


def deadline_error(timeout_s: float) -> UpstreamTimeout:
    return UpstreamTimeout(f"The request did not finish within the gateway's deadline of {timeout_s:g} s.")


def _confident(logprobs: Any, threshold: float | None) -> bool:
    from router.uncertainty import confident

    return confident(logprobs, threshold)


def _past(when: float) -> bool:
    return asyncio.get_running_loop().time() >= when


def _close_soon(upstream: AsyncIterator[dict[str, Any]]) -> None:
    """Close an upstream stream (and free its teacher slot) from any context: a cancelled
    task cannot await, so the close runs as its own task."""
    aclose = getattr(upstream, "aclose", None)
    if aclose is not None:
        task = asyncio.ensure_future(aclose())
        task.add_done_callback(lambda done: done.cancelled() or done.exception())


class ChatService:
    def __init__(
        self,
        routes: RouteTable,
        router: Router,
        student: StudentBackend,
        teachers: dict[str, TeacherClient],
        writer: BatchWriter,
        shadow: Any | None = None,
        observers: list[Observer] | None = None,
        breaker: StudentBreaker | None = None,
        trusted_for_training: Callable[[str | None], bool] | None = None,
        request_timeout_s: float = 300.0,
    ) -> None:
        self.routes = routes
        self.router = router
        self.student = student
        self.teachers = teachers
        self.writer = writer
        self.shadow = shadow
        self.observers = observers or []
        self.breaker = breaker
        # Without a key policy only an open gateway's (anonymous) rows are trained on.
        self.trusted_for_training = trusted_for_training or (lambda client_key_id: client_key_id is None)
        self._redactors: dict[str, Redactor] = {}
        self.request_timeout_s = request_timeout_s

    def redactor(self, state: RouteState) -> Redactor:
        """The route's redaction, compiled once per route."""
        name = state.config.name
        if name not in self._redactors:
            self._redactors[name] = Redactor(state.config.redact)
        return self._redactors[name]

    # -- shared steps ------------------------------------------------------------------------
    async def _begin(self, request: ChatCompletionRequest, client_key_id: str | None) -> tuple[
        RouteState, RequestRecord, Decision, dict[str, Any]
    ]:
        state = self.routes.get(request.model)
        body = request.upstream_body()
        # The log gets redacted copies (``record.redact`` at ``to_row``); upstreams get ``body``.
        record = RequestRecord(route=state.config.name, request=body, stream=request.stream,
                               client_key_id=client_key_id, redact=self.redactor(state).value,
                               train_trusted=self.trusted_for_training(client_key_id))
        decision = await self._decide(state, body["messages"])
        record.router_score = decision.score
        record.decision_reasons = list(decision.reasons)
        return state, record, decision, body

    async def _decide(self, state: RouteState, messages: list[dict[str, Any]]) -> Decision:
        """The router's decision; when the router fails, the teacher answers (never a 500)."""
        try:
            return await self.router.decide(state.policy(), messages)
        except Exception as error:  # the router is a plug-in seam (models, numpy, files): any failure is its own
            logger.exception("router failed; serving from the teacher", extra={"route": state.config.name})
            return Decision("teacher", reasons=[f"router_error: {type(error).__name__}"])

    def _student_body(self, state: RouteState, body: dict[str, Any], cascade: bool) -> dict[str, Any]:
        student_body = student_request(state.config.student.system_prompt, body)
        if cascade and not student_body.get("logprobs"):
            student_body.update(logprobs=True, top_logprobs=1)
        return student_body

    def _account(self, state: RouteState, record: RequestRecord, completion: Completion, target: str) -> None:
        record.target = target
        record.prompt_tokens = completion.prompt_tokens
        record.completion_tokens = completion.completion_tokens
        record.upstream_latency_ms = completion.latency_ms
        teacher = self.teachers[state.config.name]
        if target == "teacher":
            record.cost_usd += completion.cost_usd
            record.teacher_cost_usd = completion.cost_usd
            record.teacher_model = completion.model
        else:
            prices = state.config.student.prices
            record.cost_usd += prices.cost(completion.prompt_tokens, completion.completion_tokens)
            record.teacher_cost_usd = teacher.cost(estimate_tokens(record.request["messages"]),
                                                   completion.completion_tokens)

    def _headers(self, record: RequestRecord) -> dict[str, str]:
        headers = {
            "x-request-id": record.id,
            "x-distillgate-route": record.route,
            "x-distillgate-target": record.target or "none",
            "x-distillgate-student-version": record.student_version or "none",
        }
        if record.router_score is not None:
            headers["x-distillgate-ood-score"] = f"{record.router_score:.4f}"
        if record.fallback:
            headers["x-distillgate-fallback"] = "true"
        return headers

    async def _finish(self, record: RequestRecord) -> None:
        for observer in self.observers:
            observer(record)
        await self.writer.log(record.to_row())

    def _student_open(self, record: RequestRecord) -> bool:
        """True when the breaker keeps this request off the student: straight to the teacher."""
        if self.breaker is None or self.breaker.allow():
            return False
        record.fallback = True
        record.decision_reasons.append("student_circuit_open")
        return True

    async def _fits_student(self, record: RequestRecord, model: str, body: dict[str, Any]) -> bool:
        """False (and a reason on the record) when the prompt cannot fit the student's context."""
        fits_context = getattr(self.student, "fits_context", None)
        if fits_context is None or await fits_context(model, body):
            return True
        record.decision_reasons.append("prompt_exceeds_student_context")
        return False

    def _student_failed(self, record: RequestRecord, reason: str, *, server_fault: bool = True) -> None:
        if self.breaker is not None:
            self.breaker.record_failure(reason, server_fault=server_fault)
        record.fallback = True
        record.decision_reasons.append(reason)
        logger.warning("student failed; serving from the teacher",
                       extra={"route": record.route, "request_id": record.id, "reason": record.redact(reason)})

    # -- non-streaming -----------------------------------------------------------------------
    async def complete(self, request: ChatCompletionRequest, client_key_id: str | None = None) -> Served:
        when = deadline.start(self.request_timeout_s)
        state, record, decision, body = await self._begin(request, client_key_id)
        try:
            async with asyncio.timeout_at(when):
                completion = None
                if decision.target == "student" and state.student is not None:
                    completion = await self._try_student(state, record, decision, body)
                if completion is None:
                    completion = await self._call_teacher(state, record, body)
            record.response = shapes.completion_body(
                completion.body, record.route, completion.prompt_tokens, completion.completion_tokens
            )
            self._maybe_shadow(state, record, decision, body, completion)
            return Served(record.response, self._headers(record))
        except (TimeoutError, UpstreamError) as failure:
            # A provider library may turn the deadline's cancellation into its own error.
            if not isinstance(failure, TimeoutError) and not _past(when):
                raise
            error = deadline_error(self.request_timeout_s)
            record.fail(error.status_code, error.message)
            raise error from None
        finally:
            await self._finish(record)

    async def _try_student(self, state: RouteState, record: RequestRecord, decision: Decision,
                           body: dict[str, Any]) -> Completion | None:
        completion = await self._student_answer(state, record, decision, body)
        if completion is not None:
            self._account(state, record, completion, "student")
        return completion

    async def _student_answer(self, state: RouteState, record: RequestRecord, decision: Decision,
                              body: dict[str, Any]) -> Completion | None:
        """The student's whole answer, or None when it failed or (cascade) was not confident."""
        pointer = state.student
        assert pointer is not None
        record.student_version = pointer.version
        student_body = self._student_body(state, body, decision.cascade)
        if not await self._fits_student(record, pointer.adapter_name, student_body) or self._student_open(record):
            return None
        try:
            with self.routes.track(pointer.adapter_name):
                completion = await self.student.chat(pointer.adapter_name, student_body,
                                                     state.config.student.timeout_s)
        except UpstreamFailure as failure:
            self._student_failed(record, f"student_error: {failure}", server_fault=failure.server_fault)
            return None
        if self.breaker is not None:
            self.breaker.record_success()
        if decision.cascade and not _confident(completion.body["choices"][0].get("logprobs"),
                                              state.policy().confidence_threshold):
            record.cost_usd += state.config.student.prices.cost(completion.prompt_tokens, completion.completion_tokens)
            record.decision_reasons.append("cascade: low student confidence")
            return None
        if decision.cascade and not body.get("logprobs"):
            for choice in completion.body["choices"]:
                choice["logprobs"] = None  # asked for by the cascade, not by the client
        if body.get("tools"):
            shapes.answer_as_tool_calls(completion.body, tool_names(body["tools"]))
        return completion

    async def _call_teacher(self, state: RouteState, record: RequestRecord, body: dict[str, Any]) -> Completion:
        record.target = "teacher"
        try:
            completion = await self.teachers[state.config.name].chat(body)
        except UpstreamFailure as failure:
            error = teacher_error(failure)
            record.fail(error.status_code, str(failure))
            raise error from failure
        self._account(state, record, completion, "teacher")
        return completion

    def _maybe_shadow(self, state: RouteState, record: RequestRecord, decision: Decision,
                      body: dict[str, Any], completion: Completion) -> None:
        if self.shadow is None or not decision.shadow:
            return
        self.shadow.submit(state, record, body, completion)

    # -- streaming ---------------------------------------------------------------------------
    async def start_stream(self, request: ChatCompletionRequest, client_key_id: str | None = None,
                           stream_format: StreamFormat | None = None) -> StreamStart:
        """Resolve who serves (including a student failure before its first chunk, and on a
        cascade route the student's whole answer and its confidence), so the headers are
        known before the first byte goes out. ``stream_format`` writes the wire events
        (default: OpenAI chat chunks)."""
        when = deadline.start(self.request_timeout_s)
        state, record, decision, body = await self._begin(request, client_key_id)
        try:
            async with asyncio.timeout_at(when):
                upstream, first = None, None
                if decision.target == "student" and state.student is not None:
                    if decision.cascade or body.get("tools"):
                        upstream, first = await self._open_whole_answer_stream(state, record, decision, body)
                    else:
                        upstream, first = await self._open_student_stream(state, record, body)
                if upstream is None:
                    upstream, first = await self._open_teacher_stream(state, record, body)
        except TimeoutError:
            error = deadline_error(self.request_timeout_s)
            record.fail(error.status_code, error.message)
            await self._finish(record)
            raise error from None
        except Exception:
            await self._finish(record)
            raise
        chunk_id, created = shapes.completion_id(), int(time.time())
        wire = stream_format or ChatStreamFormat(record.route, request.include_usage, chunk_id, created)
        relay = StreamRelay(state, record, decision, body, chunk_id, created)
        return StreamStart(self._headers(record), self._relay(relay, upstream, first, wire, when))

    async def _open_whole_answer_stream(self, state: RouteState, record: RequestRecord, decision: Decision,
                                       body: dict[str, Any]) -> tuple[AsyncIterator[dict[str, Any]] | None, Any]:
        """The cascade judges a whole answer, and tool calls are parsed from one: the student
        answers in full first, then the answer is streamed (replayed as chunks) when it is
        confident; otherwise the teacher streams."""
        completion = await self._student_answer(state, record, decision, body)
        if completion is None:
            return None, None
        record.target = "student"
        upstream = shapes.completion_chunks(completion)
        return upstream, await anext(upstream)

    async def _open_student_stream(self, state: RouteState, record: RequestRecord,
                                   body: dict[str, Any]) -> tuple[AsyncIterator[dict[str, Any]] | None, Any]:
        pointer = state.student
        assert pointer is not None
        record.student_version = pointer.version
        if self._student_open(record):
            return None, None
        student_body = self._student_body(state, body, cascade=False)
        student_body["stream_options"] = {"include_usage": True}
        if not await self._fits_student(record, pointer.adapter_name, student_body) or self._student_open(record):
            return None, None
        upstream = self.student.stream(pointer.adapter_name, student_body, state.config.student.timeout_s)
        try:
            first = await upstream.__anext__()
        except UpstreamFailure as failure:
            self._student_failed(record, f"student_error: {failure!r}", server_fault=failure.server_fault)
            return None, None
        except StopAsyncIteration:
            self._student_failed(record, "student_error: the stream ended before its first chunk")
            return None, None
        if self.breaker is not None:
            self.breaker.record_success()
        record.target = "student"
        return upstream, first

    async def _open_teacher_stream(self, state: RouteState, record: RequestRecord,
                                   body: dict[str, Any]) -> tuple[AsyncIterator[dict[str, Any]], Any]:
        record.target = "teacher"
        record.teacher_model = self.teachers[state.config.name].model
        upstream = self.teachers[state.config.name].stream(body)
        try:
            first = await upstream.__anext__()
        except StopAsyncIteration:
            first = None
        except UpstreamFailure as failure:
            error = teacher_error(failure)
            record.fail(error.status_code, str(failure))
            raise error from failure
        return upstream, first

    async def _relay(self, relay: StreamRelay, upstream: AsyncIterator[dict[str, Any]], first: Any,
                     wire: StreamFormat, when: float) -> AsyncIterator[bytes]:
        record = relay.record
        started = time.perf_counter()
        logged = False  # the row is spooled before the last event goes out, and only once
        try:
            chunk = first
            while chunk is not None:
                outgoing = relay.take(chunk)
                if outgoing is not None:
                    for event in wire.chunk(outgoing):
                        yield event
                async with asyncio.timeout_at(when):
                    chunk = await anext(upstream, None)
            completion = self._stream_completion(relay, started)
            self._log_stream(relay)
            logged = True
            self._maybe_shadow(relay.state, record, relay.decision, _unstreamed(relay.body), completion)
            for event in wire.finish(shapes.usage_of(completion.prompt_tokens, completion.completion_tokens)):
                yield event
        except (UpstreamFailure, TimeoutError) as failure:
            # Past the deadline a provider library may turn its cancellation into its own error.
            error: GatewayError = deadline_error(self.request_timeout_s)
            if isinstance(failure, UpstreamFailure) and not _past(when):
                if record.target == "student" and self.breaker is not None:
                    self.breaker.record_failure(f"student stream broke: {failure}", server_fault=failure.server_fault)
                error = UpstreamError("The upstream stream was interrupted mid-answer.")
            record.fail(error.status_code, f"stream interrupted: {failure}" if error.status_code == 502 else error.message)
            self._log_stream(relay)
            logged = True
            for event in wire.error(error):
                yield event
        finally:
            if not logged:
                record.fail(499, "client disconnected mid-stream")
                self._log_stream(relay)
            _close_soon(upstream)

    def _stream_completion(self, relay: StreamRelay, started: float) -> Completion:
        """Account a finished stream; returns it as a Completion (what shadowing compares)."""
        record = relay.record
        prompt_tokens, completion_tokens = relay.usage or (estimate_tokens(record.request["messages"]),
                                                           len(relay.text))
        completion = Completion({}, prompt_tokens, completion_tokens, 0.0, (time.perf_counter() - started) * 1000,
                                record.teacher_model or "")
        if record.target == "teacher":
            completion.cost_usd = self.teachers[record.route].cost(prompt_tokens, completion_tokens)
        self._account(relay.state, record, completion, record.target or "teacher")
        completion.body = relay.response()
        return completion

    def _log_stream(self, relay: StreamRelay) -> None:
        """Log a streamed request from any context, a cancelled stream's cleanup included."""
        relay.record.response = relay.response()
        for observer in self.observers:
            observer(relay.record)
        self.writer.submit(relay.record.to_row())


def _unstreamed(body: dict[str, Any]) -> dict[str, Any]:
    """A streamed request's body as a plain call (what the shadow model is asked)."""
    return {key: value for key, value in body.items() if key not in ("stream", "stream_options")}


@dataclass
class StreamRelay:
    """What a relayed stream has carried so far: text, tool calls, usage, finish reason."""

    state: RouteState
    record: RequestRecord
    decision: Decision
    body: dict[str, Any]
    chunk_id: str
    created: int
    text: list[str] = field(default_factory=list)
    usage: tuple[int, int] | None = None
    finish_reason: str | None = None
    tool_calls: ToolCallAccumulator = field(default_factory=ToolCallAccumulator)

    def take(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """Fold one upstream chunk in; returns the chunk to send, or None."""
        self.usage = shapes.chunk_usage(chunk) or self.usage
        self.text.append(shapes.chunk_text(chunk))
        outgoing = shapes.chunk_body(chunk, self.record.route, self.chunk_id, self.created)
        if outgoing is not None:
            choice = outgoing["choices"][0]
            self.finish_reason = choice["finish_reason"] or self.finish_reason
            self.tool_calls.add(choice["delta"].get("tool_calls") or [])
        return outgoing

    def response(self) -> dict[str, Any]:
        """The streamed answer in ``chat.completion`` shape: the log row's response."""
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.text)}
        if self.tool_calls.calls:
            message["tool_calls"] = [
                {"id": call["id"], "type": "function",
                 "function": {"name": call["name"], "arguments": call["arguments"]}}
                for _, call in sorted(self.tool_calls.calls.items())
            ]
        return {"object": "chat.completion", "model": self.record.route, "streamed": True,
                "choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason}]}
