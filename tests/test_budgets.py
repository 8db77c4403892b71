"""Per-key monthly budgets through the gateway: ``refuse`` answers 429 ``budget_exceeded``
once the month's spend reaches the budget; ``student_only`` sends the key's requests to the
student only (429 when no student can answer); the spend is seeded from the store at startup.
In-process (ASGI, a priced stand-in teacher), then through uvicorn with the replay teacher
and the official SDK."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import openai
import pytest

from core.config import Settings
from core.store import SQLiteStore
from core.upstream import Completion
from gateway.app import Components, create_app
from gateway.auth import key_id
from gateway.upstream.student import VLLMStudent
from router.decision import PolicyRouter
from tests.helpers import MESSAGES, CountingApp, UvicornThread, log_rows, sdk

REFUSED_KEY = "sk-refused-1a2b3c4d-secret"
THRIFTY_KEY = "sk-thrifty-5e6f7a8b-secret"
FREE_KEY = "sk-free-9c0d1e2f-secret"
PRICE = 0.01  # every teacher call


class PricedTeacher:
    """Answers "transfer" at ``PRICE`` a call, and counts its calls."""

    model = "stand-in/teacher"

    def __init__(self) -> None:
        self.calls = 0

    async def chat(self, body: dict[str, Any]) -> Completion:
        self.calls += 1
        return Completion({"id": "t", "object": "chat.completion", "created": 1, "model": self.model,
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": "transfer"}}]},
                          10, 1, PRICE, 1.0, self.model)

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        self.calls += 1
        yield {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "transfer"}, "finish_reason": "stop"}]}

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return PRICE

    async def healthy(self) -> bool:
        return True


def student_reply(request: httpx.Request) -> httpx.Response:
    if request.method == "GET":  # the breaker's health probe
        return httpx.Response(200, json={"object": "list", "data": [{"id": "base", "object": "model"}]})
    body = json.loads(request.content)
    if "logprobs" in body:
        return httpx.Response(400, json={"error": {"message": "no cascade was asked for"}})
    if body["messages"][-1]["content"] == "break":
        return httpx.Response(500, json={"error": {"message": "engine dead"}})
    if body.get("stream"):
        chunk = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "student-answer"},
                              "finish_reason": "stop"}]}
        return httpx.Response(200, text=f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n",
                              headers={"content-type": "text/event-stream"})
    return httpx.Response(200, json={
        "id": "s", "object": "chat.completion", "created": 1, "model": body["model"],
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "student-answer"}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})


@pytest.fixture
def budget_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, key in (("REFUSED_KEY", REFUSED_KEY), ("THRIFTY_KEY", THRIFTY_KEY), ("FREE_KEY", FREE_KEY)):
        monkeypatch.setenv(name, key)


def budget_settings(make_settings: Callable[..., Settings], teacher_url: str = "http://127.0.0.1:9",
                    live_student: bool = True, budget: float = 1.5 * PRICE) -> Settings:
    # teacher_only: before its budget is spent every key is served by the teacher.
    return make_settings(teacher_url, route={"mode": "teacher_only", "confidence_threshold": -0.5, "shadow_rate": 1.0,
                                             "student": {"serve_base_model": live_student}},
                         auth={"keys": [{"key_env": "REFUSED_KEY", "monthly_budget_usd": budget},
                                        {"key_env": "THRIFTY_KEY", "monthly_budget_usd": budget,
                                         "over_budget": "student_only"},
                                        {"key_env": "FREE_KEY"}]})


class Gateway:
    """The app in-process: lifespan run, requests over ASGI."""

    def __init__(self, settings: Settings) -> None:
        self.teacher = PricedTeacher()
        student = VLLMStudent("http://student.invalid", transport=httpx.MockTransport(student_reply))
        self.app = create_app(settings, Components(student=student, teachers={"clinc-intents": self.teacher},
                                                   router=PolicyRouter()))

    async def __aenter__(self) -> Gateway:
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://gateway")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()
        await self._lifespan.__aexit__(None, None, None)

    async def chat(self, key: str, content: str = "transfer $20 to savings", **extra: Any) -> httpx.Response:
        return await self.client.post("/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                                      json={"model": "clinc-intents", "messages": [{"role": "user", "content": content}],
                                            **extra})


def assert_budget_429(response: httpx.Response, text: str) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "budget_exceeded")
    assert text in error["message"], error["message"]
    assert response.headers["x-should-retry"] == "false" and int(response.headers["retry-after"]) > 0


async def test_refuse_answers_429_once_the_budget_is_spent(budget_env: None,
                                                           make_settings: Callable[..., Settings]) -> None:
    settings = budget_settings(make_settings)
    async with Gateway(settings) as gateway:
        served = [await gateway.chat(REFUSED_KEY) for _ in range(2)]  # 0.01, then 0.02 of 0.015
        refused = await gateway.chat(REFUSED_KEY)
        streamed = await gateway.chat(REFUSED_KEY, stream=True)
        completions = await gateway.client.post("/v1/completions", headers={"authorization": f"Bearer {REFUSED_KEY}"},
                                                json={"model": "clinc-intents", "prompt": "hi"})
        free = await gateway.chat(FREE_KEY)  # no budget: other keys are not affected
        assert gateway.teacher.calls == 3
        spent = gateway.app.state.budgets.spent(key_id(REFUSED_KEY))
    assert [response.status_code for response in served] == [200, 200] and free.status_code == 200
    assert_budget_429(refused, "monthly budget of $0.015")
    assert_budget_429(streamed, "monthly budget")
    assert_budget_429(completions, "completions are served only by the teacher's provider")
    assert spent == pytest.approx(2 * PRICE)
    assert len(log_rows(settings, 3)) == 3  # refused before routing: not logged


async def test_student_only_routes_to_the_student_then_429_when_it_cannot(
        budget_env: None, make_settings: Callable[..., Settings]) -> None:
    settings = budget_settings(make_settings)
    async with Gateway(settings) as gateway:
        before = [(await gateway.chat(THRIFTY_KEY)).headers["x-distillgate-target"] for _ in range(2)]
        teacher_calls = gateway.teacher.calls
        after = await gateway.chat(THRIFTY_KEY)
        streamed = await gateway.chat(THRIFTY_KEY, stream=True)
        broken = await gateway.chat(THRIFTY_KEY, "break")  # the student fails: no teacher fallback
        assert gateway.teacher.calls == teacher_calls == 2  # no fallback, no cascade, no shadow call
    assert before == ["teacher", "teacher"]
    assert after.status_code == 200 and after.headers["x-distillgate-target"] == "student"
    assert after.json()["choices"][0]["message"]["content"] == "student-answer"
    assert streamed.headers["x-distillgate-target"] == "student" and "student-answer" in streamed.text
    assert_budget_429(broken, "the student could not answer this request")
    rows = log_rows(settings, 5)
    assert [(row["target"], row["status_code"]) for row in rows][2:] == [("student", 200), ("student", 200),
                                                                         (None, 429)]
    assert "over_budget: student_only" in json.loads(rows[2]["decision_reasons"])


async def test_student_only_without_a_live_student_is_429(budget_env: None,
                                                          make_settings: Callable[..., Settings]) -> None:
    settings = budget_settings(make_settings, live_student=False)
    async with Gateway(settings) as gateway:
        statuses = [(await gateway.chat(THRIFTY_KEY)).status_code for _ in range(2)]
        refused = await gateway.chat(THRIFTY_KEY)
    assert statuses == [200, 200]
    assert_budget_429(refused, "this route has no live student")


async def test_spend_this_month_is_seeded_from_the_store(budget_env: None,
                                                         make_settings: Callable[..., Settings]) -> None:
    settings = budget_settings(make_settings)
    store = SQLiteStore(settings.store.path)
    month_ago = time.time() - 32 * 86400  # always last month or earlier
    store.insert_requests([
        {"id": "spent", "created_at": time.time() - 1, "route": "clinc-intents", "status_code": 200,
         "cost_usd": 0.02, "client_key_id": key_id(REFUSED_KEY)},
        {"id": "old", "created_at": month_ago, "route": "clinc-intents", "status_code": 200,
         "cost_usd": 100.0, "client_key_id": key_id(THRIFTY_KEY)}])
    store.close()
    async with Gateway(settings) as gateway:
        refused = await gateway.chat(REFUSED_KEY)
        thrifty = await gateway.chat(THRIFTY_KEY)
    assert_budget_429(refused, "monthly budget")
    assert thrifty.headers["x-distillgate-target"] == "teacher"  # last month's spend is not this month's


def test_sdk_sees_429_once_a_tiny_budget_is_spent(budget_env: None, make_settings: Callable[..., Settings],
                                                  replay_teacher: str) -> None:
    """Real servers on loopback: the gateway under uvicorn, the replay teacher, the SDK."""
    settings = budget_settings(make_settings, replay_teacher, live_student=False, budget=1e-9)
    counted = CountingApp(create_app(settings))
    with UvicornThread(counted) as server:
        refused, thrifty, free = sdk(server.url, REFUSED_KEY), sdk(server.url, THRIFTY_KEY), sdk(server.url, FREE_KEY)
        assert refused.chat.completions.create(model="clinc-intents", messages=MESSAGES).choices[0].message.content
        retrying = openai.OpenAI(base_url=f"{server.url}/v1", api_key=REFUSED_KEY, max_retries=3, timeout=30)
        with pytest.raises(openai.RateLimitError) as over:
            retrying.chat.completions.create(model="clinc-intents", messages=MESSAGES)
        assert counted.calls == 2  # the SDK did not retry a spent budget
        thrifty.chat.completions.create(model="clinc-intents", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as no_student:
            thrifty.chat.completions.create(model="clinc-intents", messages=MESSAGES, stream=True)
        for _ in range(3):
            free.chat.completions.create(model="clinc-intents", messages=MESSAGES)
        assert refused.models.list().data  # only spending is refused, not the key
        rows = log_rows(settings, 5)
    assert over.value.code == "budget_exceeded" and over.value.type == "insufficient_quota"
    assert "monthly budget of $1e-09" in over.value.message
    assert over.value.response.headers["x-should-retry"] == "false"
    assert no_student.value.code == "budget_exceeded" and "no live student" in no_student.value.message
    assert len(rows) == 5 and all(row["status_code"] == 200 and row["cost_usd"] > 0 for row in rows)


async def test_dashboard_shows_spend_by_key_and_budgets(budget_env: None, make_settings: Callable[..., Settings],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLGATE_ADMIN_TOKEN", "admin-secret")
    settings = budget_settings(make_settings)
    async with Gateway(settings) as gateway:
        for key in (REFUSED_KEY, REFUSED_KEY, FREE_KEY):
            assert (await gateway.chat(key)).status_code == 200
        while gateway.app.state.writer.rows_written < 3:  # the batched writer runs on this loop
            await asyncio.sleep(0.01)
        page = await gateway.client.get("/dashboard", headers={"authorization": "Bearer admin-secret"})
    assert page.status_code == 200
    table = page.text.split('id="keys"', 1)[1].split("</table>", 1)[0]
    rows = {label: next(row for row in table.split("<tr>") if f"{label} (" in row)
            for label in ("REFUSED_KEY", "THRIFTY_KEY", "FREE_KEY")}
    assert key_id(REFUSED_KEY) in rows["REFUSED_KEY"]
    cells = [cell.split("</td>")[0].strip() for cell in rows["REFUSED_KEY"].split("<td>")[1:]]
    # requests, student share, cost, all-teacher, savings, this month, budget (spent)
    assert cells[1:7] == ["2", "0.0%", "$0.0200", "$0.0200", "$0.000000", "$0.0200"]
    assert cells[7].startswith("$0.0150") and "spent" in cells[7]
    assert "$0.0100" in rows["FREE_KEY"] and "spent" not in rows["FREE_KEY"]
    assert "<td>0</td>" in rows["THRIFTY_KEY"]  # a budgeted key shows before its first request
    for secret in (REFUSED_KEY, THRIFTY_KEY, FREE_KEY):
        assert secret not in page.text
