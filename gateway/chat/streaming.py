"""The streamed half of the chat service: who streams (the student, its whole answer on a
cascade route, or the teacher), relaying the upstream's chunks in the client's wire format,
and logging the streamed answer once, however the stream ends."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from core.upstream import Completion, UpstreamFailure
from gateway import deadline
from gateway.chat import shapes
from gateway.chat.protocol import ChatCompletionRequest
from gateway.chat.record import RequestRecord, estimate_tokens
from gateway.chat.stream_format import ChatStreamFormat, StreamFormat, ToolCallAccumulator
from gateway.errors import GatewayError, RateLimited, Unavailable, UpstreamError, UpstreamTimeout
from gateway.route_table import RouteState
from router.decision import Decision


@dataclass
class StreamStart:
    headers: dict[str, str]
    events: AsyncIterator[bytes]


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


def _past(when: float) -> bool:
    return asyncio.get_running_loop().time() >= when


def _close_soon(upstream: AsyncIterator[dict[str, Any]]) -> None:
    """Close an upstream stream (and free its teacher slot) from any context: a cancelled
    task cannot await, so the close runs as its own task."""
    aclose = getattr(upstream, "aclose", None)
    if aclose is not None:
        task = asyncio.ensure_future(aclose())
        task.add_done_callback(lambda done: done.cancelled() or done.exception())


class StreamingMixin:
    """``ChatService``'s streaming methods; they use the service's upstreams and log."""

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
        chunk_id, created = shapes.completion_id(record.id), int(time.time())
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
        pointer = record.student_pointer or state.student
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
            # Up to the first chunk: the rest of the answer is relayed after the headers go out.
            with self.tracing.span("student.call", **record.trace_attributes(), adapter=pointer.adapter_name,
                                   stream=True):
                first = await upstream.__anext__()
        except UpstreamFailure as failure:
            self._student_failed(record, f"student_error: {failure!r}")
            return None, None
        except StopAsyncIteration:
            self._student_failed(record, "student_error: the stream ended before its first chunk")
            return None, None
        record.target = "student"
        return upstream, first

    async def _open_teacher_stream(self, state: RouteState, record: RequestRecord,
                                   body: dict[str, Any]) -> tuple[AsyncIterator[dict[str, Any]], Any]:
        self._refuse_teacher(record)
        record.target = "teacher"
        record.teacher_model = self.teachers[state.config.name].model
        upstream = self.teachers[state.config.name].stream(body)
        try:
            with self.tracing.span("teacher.call", **record.trace_attributes(), teacher_model=record.teacher_model,
                                   stream=True):
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
        with self.tracing.span("log.write", **relay.record.trace_attributes(), status_code=relay.record.status_code,
                               stream=True):
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
