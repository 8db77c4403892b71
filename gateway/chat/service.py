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
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.prompting import student_request
from core.store import BatchWriter
from core.tool_calls import tool_names
from core.upstream import Completion, TeacherClient, UpstreamFailure
from gateway import deadline
from gateway.budgets import KeyBudgets
from gateway.chat import shapes
from gateway.chat.protocol import ChatCompletionRequest
from gateway.chat.record import RequestRecord, estimate_tokens
from gateway.chat.streaming import (
    StreamingMixin,
    _past,
    deadline_error,
    teacher_error,
)
from gateway.errors import (
    UpstreamError,
)
from gateway.redact import Redactor
from gateway.route_table import RouteState, RouteTable
from gateway.tracing import Tracing
from gateway.upstream.pool import StudentPool
from router.decision import Decision, Router
from router.uncertainty import cascade_score

logger = logging.getLogger(__name__)

Observer = Callable[[RequestRecord], None]


@dataclass
class Served:
    body: dict[str, Any]
    headers: dict[str, str]


class ChatService(StreamingMixin):
    def __init__(
        self,
        routes: RouteTable,
        router: Router,
        student: StudentPool,
        teachers: dict[str, TeacherClient],
        writer: BatchWriter,
        shadow: Any | None = None,
        observers: list[Observer] | None = None,
        trusted_for_training: Callable[[str | None], bool] | None = None,
        request_timeout_s: float = 300.0,
        budgets: KeyBudgets | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.routes = routes
        self.router = router
        self.student = student
        self.teachers = teachers
        self.writer = writer
        self.shadow = shadow
        self.observers = observers or []
        # Without a key policy only an open gateway's (anonymous) rows are trained on.
        self.trusted_for_training = trusted_for_training or (lambda client_key_id: client_key_id is None)
        self._redactors: dict[str, Redactor] = {}
        self.request_timeout_s = request_timeout_s
        self.budgets = budgets
        self.tracing = tracing or Tracing()
        self._random = random.Random()  # the canary's shadow samples; the split itself is seeded

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
        student_only = self._student_only(state, client_key_id)
        body = request.upstream_body()
        # The log gets redacted copies (``record.redact`` at ``to_row``); upstreams get ``body``.
        record = RequestRecord(route=state.config.name, request=body, stream=request.stream,
                               client_key_id=client_key_id, redact=self.redactor(state).value,
                               train_trusted=self.trusted_for_training(client_key_id), student_only=student_only)
        if student_only:
            # Not the router's call: no cascade (its low-confidence answers would go to the
            # teacher) and no shadow sample (a teacher call).
            decision = Decision("student", reasons=["over_budget: student_only"])
        else:
            with self.tracing.span("router.decide", **record.trace_attributes()) as span:
                decision = await self._decide(state, body["messages"])
                self.tracing.set(span, target=decision.target, ood_score=decision.score,
                                 reason_count=len(decision.reasons), cascade=decision.cascade)
        record.router_score = decision.score
        record.decision_reasons = list(decision.reasons)
        if decision.target == "student":
            self._choose_student(state, record, decision)
        return state, record, decision, body

    def _choose_student(self, state: RouteState, record: RequestRecord, decision: Decision) -> None:
        """Live or canary, for a request the router sent to the student. During a canary both
        arms are shadowed at their own rates (evidence for the rollout's test), and the canary
        answers under its own calibrated cascade threshold."""
        record.student_pointer, record.canary = state.student_for(record.id)
        run = state.canary
        if run is None or record.student_only:
            return
        if record.canary:
            decision.cascade = state.confidence_threshold(record.student_pointer) is not None
            decision.shadow = decision.shadow or self._random.random() < run.config.shadow_rate
            decision.reasons.append(f"canary {run.version} (share {run.config.canary_share})")
            record.decision_reasons.append(decision.reasons[-1])
        elif not decision.shadow and self._random.random() < run.live_shadow_rate:
            decision.shadow = True

    def _student_only(self, state: RouteState, client_key_id: str | None) -> bool:
        """True when the key is over its budget and only the student may answer; raises the
        429 when the key is refused outright or the route has no live student."""
        if not self.budgets:
            return False
        over_budget = self.budgets.over_budget(client_key_id)
        if over_budget == "refuse":
            raise self.budgets.exceeded(client_key_id)
        if over_budget == "student_only" and state.student is None:
            raise self.budgets.exceeded(client_key_id, "only the student may answer it, and this route has "
                                                       "no live student")
        return over_budget == "student_only"

    def _refuse_teacher(self, record: RequestRecord) -> None:
        """Raises the 429 when the teacher may not answer this request (key over budget)."""
        if record.student_only and self.budgets:
            error = self.budgets.exceeded(record.client_key_id, "only the student may answer it, and the student "
                                                                "could not answer this request")
            record.fail(error.status_code, error.message)
            raise error

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
        if record.canary:
            headers["x-distillgate-canary"] = "true"
        if record.router_score is not None:
            headers["x-distillgate-ood-score"] = f"{record.router_score:.4f}"
        if record.fallback:
            headers["x-distillgate-fallback"] = "true"
        return headers

    async def _finish(self, record: RequestRecord) -> None:
        for observer in self.observers:
            observer(record)
        with self.tracing.span("log.write", **record.trace_attributes(), status_code=record.status_code):
            await self.writer.log(record.to_row())

    def _student_open(self, record: RequestRecord) -> bool:
        """True when every student server's breaker is open: straight to the teacher. (The
        pool records each call's outcome on the breaker of the server that made it.)"""
        if self.student.available():
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

    def _student_failed(self, record: RequestRecord, reason: str) -> None:
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
                completion.body, record.route, completion.prompt_tokens, completion.completion_tokens, record.id
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
        pointer = record.student_pointer or state.student
        assert pointer is not None
        record.student_version = pointer.version
        student_body = self._student_body(state, body, decision.cascade)
        if not await self._fits_student(record, pointer.adapter_name, student_body) or self._student_open(record):
            return None
        try:
            with (self.routes.track(pointer.adapter_name),
                  self.tracing.span("student.call", **record.trace_attributes(), adapter=pointer.adapter_name)):
                completion = await self.student.chat(pointer.adapter_name, student_body,
                                                     state.config.student.timeout_s)
        except UpstreamFailure as failure:
            self._student_failed(record, f"student_error: {failure}")
            return None
        if decision.cascade and not self._cascade_passes(state, record, decision, completion):
            record.cost_usd += state.config.student.prices.cost(completion.prompt_tokens, completion.completion_tokens)
            return None
        if decision.cascade and not body.get("logprobs"):
            for choice in completion.body["choices"]:
                choice["logprobs"] = None  # asked for by the cascade, not by the client
        if body.get("tools"):
            shapes.answer_as_tool_calls(completion.body, tool_names(body["tools"]))
        return completion

    def _cascade_passes(self, state: RouteState, record: RequestRecord, decision: Decision,
                        completion: Completion) -> bool:
        # The answering version's own threshold: a canary is judged by its calibration, not live's.
        threshold = state.confidence_threshold(record.student_pointer) if record.canary \
            else state.policy().confidence_threshold
        cascade = state.config.cascade
        with self.tracing.span("cascade.check", **record.trace_attributes()) as span:
            choice = completion.body["choices"][0]
            content = (choice.get("message") or {}).get("content")
            answer = content if isinstance(content, str) else ""
            escalated = cascade.escalates(answer)
            # No logprobs: the cascade cannot vouch for the answer (score None).
            score = None if escalated else cascade_score(choice.get("logprobs"), answer, decision.neighbour_answers,
                                                         cascade.disagreement_penalty)
            passed = not (escalated or score is None or threshold is None or score < threshold)
            self.tracing.set(span, cascade_score=score, cascade_threshold=threshold, cascade_passed=passed)
        if escalated:
            record.decision_reasons += ["cascade: the student escalated",
                                        f"cascade: answer {answer.strip()[:40]!r} is in escalate_answers"]
            return False
        if not passed:
            shown = "no logprobs" if score is None else f"score {score:.3f}"
            record.decision_reasons += ["cascade: low student confidence",
                                        f"cascade: {shown} < confidence_threshold {threshold}"]
            return False
        return True

    async def _call_teacher(self, state: RouteState, record: RequestRecord, body: dict[str, Any]) -> Completion:
        self._refuse_teacher(record)
        record.target = "teacher"
        teacher = self.teachers[state.config.name]
        try:
            with self.tracing.span("teacher.call", **record.trace_attributes(), teacher_model=teacher.model) as span:
                completion = await teacher.chat(body)
                self.tracing.set(span, teacher_model=completion.model)  # the fallback model, when it answered
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
