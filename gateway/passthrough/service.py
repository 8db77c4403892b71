"""Serving a forwarded request: resolve the route, call its provider, shape, log with cost.

Logged with ``target = "passthrough"``: the row counts in the route's requests and cost,
but never as a teacher answer to train on (the student serves chat only).
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from core.config import RedactConfig
from core.store import BatchWriter
from core.upstream import Completion, UpstreamFailure
from gateway.budgets import KeyBudgets
from gateway.chat.record import RequestRecord
from gateway.chat.service import Observer, Served, teacher_error
from gateway.errors import InvalidRequest
from gateway.passthrough.upstream import ProviderPassthrough
from gateway.redact import redact_text
from gateway.route_table import RouteState, RouteTable


def redacted(body: dict[str, Any], field: str, config: RedactConfig) -> dict[str, Any]:
    """The body as logged: the prompt or input text redacted as the route asks."""
    value = body.get(field)
    if not config.enabled or value is None:
        return body
    if isinstance(value, str):
        return {**body, field: redact_text(value, config)}
    if isinstance(value, list):
        return {**body, field: [redact_text(item, config) if isinstance(item, str) else item for item in value]}
    return body


def base64_vectors(data: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Embeddings as OpenAI's ``encoding_format: base64``: little-endian float32, base64."""
    return [{**item, "embedding": base64.b64encode(struct.pack(f"<{len(item['embedding'])}f",
                                                               *item["embedding"])).decode()}
            for item in data]


class PassthroughService:
    def __init__(self, routes: RouteTable, writer: BatchWriter, observers: list[Observer] | None = None,
                 budgets: KeyBudgets | None = None) -> None:
        self.routes = routes
        self.writer = writer
        self.observers = observers or []
        self.budgets = budgets
        self._clients: dict[str, ProviderPassthrough] = {}

    def _client(self, state: RouteState) -> ProviderPassthrough:
        name = state.config.name
        if name not in self._clients:
            self._clients[name] = ProviderPassthrough(state.config.teacher)
        return self._clients[name]

    async def complete(self, body: dict[str, Any], client_key_id: str | None) -> Served:
        state = self.routes.get(body["model"])
        client = self._client(state)
        served = await self._serve(state, body, "prompt", "completions", client_key_id, client.text_completion)
        served.body = {**served.body, "model": state.config.name}
        return served

    async def embed(self, body: dict[str, Any], client_key_id: str | None) -> Served:
        state = self.routes.get(body["model"])
        if state.config.teacher.embedding_model is None:
            raise InvalidRequest(f"The route `{state.config.name}` serves no embeddings: its teacher names no "
                                 "embedding_model.", param="model")
        served = await self._serve(state, body, "input", "embeddings", client_key_id, self._client(state).embedding)
        data = served.body.get("data") or []
        if body.get("encoding_format") == "base64":
            data = base64_vectors(data)
        served.body = {"object": "list", "data": data, "model": state.config.name, "usage": served.body.get("usage")}
        return served

    async def _serve(self, state: RouteState, body: dict[str, Any], field: str, kind: str, client_key_id: str | None,
                     call: Callable[[dict[str, Any]], Awaitable[Completion]]) -> Served:
        # Only the teacher's provider serves these: a key over its budget is refused whatever
        # its over_budget says.
        if self.budgets and self.budgets.over_budget(client_key_id) is not None:
            raise self.budgets.exceeded(client_key_id, f"{kind} are served only by the teacher's provider")
        record = RequestRecord(route=state.config.name, request=redacted(body, field, state.config.redact),
                               stream=False, client_key_id=client_key_id, target="passthrough",
                               decision_reasons=[f"passthrough: {kind}"])
        try:
            completion = await call(body)
        except UpstreamFailure as failure:
            error = teacher_error(failure)
            record.fail(error.status_code, str(failure))
            await self._finish(record)
            raise error from failure
        record.prompt_tokens, record.completion_tokens = completion.prompt_tokens, completion.completion_tokens
        record.upstream_latency_ms, record.teacher_model = completion.latency_ms, completion.model
        record.cost_usd = record.teacher_cost_usd = completion.cost_usd
        record.response = completion.body
        await self._finish(record)
        return Served(completion.body, {"x-request-id": record.id, "x-distillgate-route": record.route,
                                        "x-distillgate-target": "passthrough"})

    async def _finish(self, record: RequestRecord) -> None:
        for observer in self.observers:
            observer(record)
        await self.writer.log(record.to_row())
