"""Reporting on canary rollouts, from the audit log and the request and feedback tables:
per canary, when it ran, how it ended, how many requests it served and the feedback on them.

A canary runs from its ``canary_start`` audit event to its ending event (``canary_promote``,
``canary_rollback``, ``canary_abandon``, ``canary_promotion_failed``); while it runs, the
requests its version answered are the canary's. One still running (or cut short by a
restart) is counted up to now.
"""

from __future__ import annotations

import json
import time
from typing import Any

from core.store.reporting import Queryable

ENDINGS = ("canary_promote", "canary_rollback", "canary_abandon", "canary_promotion_failed")

_EVENTS_SQL = ("select route, field, new_json, at from route_audit where field = 'canary_start' "
               f"or field in ({', '.join('?' for _ in ENDINGS)}) order by at, id")
_SERVED_SQL = ("select count(*) as saw, coalesce(sum(case when target = 'student' then 1 else 0 end), 0) as served from requests "
               "where route = ? and student_version = ? and created_at >= ? and created_at <= ?")
_FEEDBACK_SQL = ("select count(*) as feedback, coalesce(sum(case when f.rating = 'down' then 1 else 0 end), 0) as thumbs_down, "
                 "coalesce(sum(case when f.rating = 'up' then 1 else 0 end), 0) as thumbs_up, coalesce(sum(case when f.score < 0.5 then 1 else 0 end), 0) as low_scores "
                 "from feedback f join requests r on r.id = f.request_id "
                 "where r.route = ? and r.student_version = ? and r.target = 'student' "
                 "and r.created_at >= ? and r.created_at <= ?")


def canary_tally(store: Queryable) -> list[dict[str, Any]]:
    """Every canary, oldest first: route, version, live version, start, end, outcome, the
    requests routed to it (``saw``: the cascade may have passed some to the teacher) and
    served, and the feedback on its answers (rows, thumbs up and down, scores below 0.5)."""
    canaries: list[dict[str, Any]] = []
    running: dict[str, dict[str, Any]] = {}
    for event in store.query(_EVENTS_SQL, list(ENDINGS)):
        detail = json.loads(event["new_json"] or "{}") or {}
        if event["field"] == "canary_start":
            if "refused" in detail:
                continue
            running[event["route"]] = {"route": event["route"], "version": detail.get("version"),
                                       "live_version": detail.get("live_version"), "started_at": event["at"],
                                       "ended_at": None, "outcome": "running",
                                       "canary_share": detail.get("canary_share")}
            canaries.append(running[event["route"]])
        elif (canary := running.pop(event["route"], None)) is not None:
            canary["ended_at"], canary["outcome"] = event["at"], event["field"].removeprefix("canary_")
            canary["reason"] = (detail.get("verdict") or {}).get("reason")
    for canary in canaries:
        window = [canary["route"], canary["version"], canary["started_at"], canary["ended_at"] or time.time()]
        canary.update(store.query(_SERVED_SQL, window)[0])
        canary["feedback"] = store.query(_FEEDBACK_SQL, window)[0]
    return canaries


def feedback_totals(store: Queryable) -> dict[str, int]:
    """All feedback rows: how many, on student answers, thumbs up and down, low scores, corrections."""
    return store.query(
        "select count(*) as rows, coalesce(sum(case when target = 'student' then 1 else 0 end), 0) as on_student_answers, "
        "coalesce(sum(case when rating = 'up' then 1 else 0 end), 0) as thumbs_up, coalesce(sum(case when rating = 'down' then 1 else 0 end), 0) as thumbs_down, "
        "coalesce(sum(case when score < 0.5 then 1 else 0 end), 0) as low_scores, coalesce(sum(case when correction is not null then 1 else 0 end), 0) as corrections "
        "from feedback")[0]
