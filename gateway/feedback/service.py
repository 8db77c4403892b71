"""Storing feedback: find the rated request, check that the caller sent it, write, count.

A request's log row is written off the request path (core/store/writer.py), so a client
rating an answer at once may find no row yet: the service remembers the newest requests it
saw finish (as a request observer) and looks in the store only for older ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from core.route_config import RedactConfig
from core.store import STORE_ERRORS, Store
from gateway.chat.record import RequestRecord
from gateway.errors import NotFound, Unavailable
from gateway.feedback.protocol import FeedbackRequest
from gateway.redact import Redactor
from gateway.route_table import RouteTable

logger = logging.getLogger(__name__)

# Far more than a healthy writer holds back (it flushes every 50 ms by default); only while the
# store is down for long can a request drop out of here before its row is written.
RECENT_REQUESTS = 10_000


class FeedbackService:
    def __init__(self, store: Store, routes: RouteTable, count: Callable[[str, str, str], None],
                 trusted_for_training: Callable[[str | None], bool], recent_max: int = RECENT_REQUESTS) -> None:
        self.store = store
        self.routes = routes
        self.count = count  # (route, target, rating): the metrics counter
        self.trusted_for_training = trusted_for_training
        self._recent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._recent_max = recent_max
        self._redactors: dict[str, Redactor] = {}
        # Called with (route, target, student_version, rating, score) per feedback stored.
        self.observers: list[Callable[[str, str, str | None, str | None, float | None], None]] = []

    def remember(self, record: RequestRecord) -> None:
        """The request observer: who sent each finished request, until its row is surely stored."""
        self._recent[record.id] = {"id": record.id, "route": record.route, "target": record.target,
                                   "client_key_id": record.client_key_id, "student_version": record.student_version}
        while len(self._recent) > self._recent_max:
            self._recent.popitem(last=False)

    async def submit(self, feedback: FeedbackRequest, client_key_id: str | None) -> dict[str, Any]:
        try:
            owner = self._recent.get(feedback.request_id) or await asyncio.to_thread(
                self.store.request_owner, feedback.request_id)
            # Another key's request answers as an unknown one: its existence is not told.
            if owner is None or (client_key_id is not None and owner["client_key_id"] != client_key_id):
                raise NotFound(f"No request with id '{feedback.request_id}'.", param="request_id")
            row = self._row(feedback, owner, client_key_id)
            row["id"] = await asyncio.to_thread(self.store.insert_feedback, row)
        except STORE_ERRORS as error:
            logger.warning("feedback not stored", extra={"error": str(error)})
            raise Unavailable("Feedback could not be stored right now; try again.",
                              headers={"retry-after": "1"}) from None
        self.count(row["route"], row["target"], feedback.rating or "none")
        for observer in self.observers:
            observer(row["route"], row["target"], owner.get("student_version"), feedback.rating, feedback.score)
        logger.info("feedback", extra={"route": row["route"], "target": row["target"], "request_id": owner["id"],
                                       "rating": feedback.rating, "corrected": feedback.correction is not None})
        return {"id": f"feedback-{row['id']}", "object": "feedback", "request_id": owner["id"],
                "route": row["route"], "created_at": int(row["created_at"])}

    def _row(self, feedback: FeedbackRequest, owner: dict[str, Any], client_key_id: str | None) -> dict[str, Any]:
        redact = self._redactor(owner["route"])
        return {"request_id": owner["id"], "route": owner["route"], "target": owner["target"] or "none",
                "client_key_id": client_key_id, "train_trusted": int(self.trusted_for_training(client_key_id)),
                "rating": feedback.rating, "score": feedback.score,
                # Redacted as the request's own row was: the correction becomes training data.
                "correction": redact.text(feedback.correction) if feedback.correction is not None else None,
                "comment": redact.text(feedback.comment) if feedback.comment is not None else None,
                "created_at": time.time()}

    def _redactor(self, route: str) -> Redactor:
        if route not in self._redactors:
            state = next((state for state in self.routes if state.config.name == route), None)
            # A route gone from the config since: the default redaction (secrets) still applies.
            self._redactors[route] = Redactor(state.config.redact if state is not None else RedactConfig())
        return self._redactors[route]
