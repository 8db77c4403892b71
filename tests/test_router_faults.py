"""A router that fails (its model, its files, a bug) never costs the client a 500: the
teacher answers, through a real gateway, and the reason is logged."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from core.config import Settings
from gateway.app import Components, create_app
from router.decision import Decision, RoutePolicy
from tests.helpers import MESSAGES, UvicornThread, log_rows, sdk


class BrokenRouter:
    async def decide(self, policy: RoutePolicy, messages: list[dict[str, Any]]) -> Decision:
        raise ValueError("embedding model returned NaN")


def test_a_router_exception_is_served_by_the_teacher(make_settings: Callable[..., Settings],
                                                     replay_teacher: str) -> None:
    settings = make_settings(replay_teacher, route={"student": {"serve_base_model": True}})
    with UvicornThread(create_app(settings, Components(router=BrokenRouter()))) as server:
        client = sdk(server.url)
        raw = client.chat.completions.with_raw_response.create(model="clinc-intents", messages=MESSAGES)
        streamed = list(client.chat.completions.create(model="clinc-intents", messages=MESSAGES, stream=True))
    assert raw.headers["x-distillgate-target"] == "teacher" and raw.parse().choices[0].message.content
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    rows = log_rows(settings, 2)
    assert all(json.loads(row["decision_reasons"]) == ["router_error: ValueError"] for row in rows)
    assert all(row["status_code"] == 200 for row in rows)
