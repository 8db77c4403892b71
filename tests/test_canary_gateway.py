"""Canary rollout through the gateway (uvicorn, real SQLite, the replay teacher; vLLM over a
mock transport whose answer depends on the adapter asked): the split, the evidence, the
automatic decision, the manual endings, the audit log, /admin/routes and /metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.config import Settings
from core.registry import CandidateVersion, Registry
from core.store import SQLiteStore
from core.store.canaries import canary_tally, feedback_totals
from gateway.app import Components, create_app
from gateway.upstream.student import VLLMStudent
from tests.helpers import UvicornThread, completion_with_logprob, fake_adapter, log_rows, sdk
from tests.operators import STUDENT_ANSWER, ScoringRouter, _student_reply

ROUTE = "clinc-intents"
ADMIN = {"authorization": "Bearer admin-secret"}
BASE = f"/admin/routes/{ROUTE}"
# CLINC150 "transfer" utterances the test router sends to the student (scores <= 0.5).
TRANSFERS = ["i need $20000 transferred from my savings to my checking",
             "complete a transaction from savings to checking of $20000",
             "transfer $20000 from my savings account to checking account",
             "take $20000 from savings and put it in checking"]


def _vllm(canary_answer: str) -> Callable[[httpx.Request], httpx.Response]:
    """vLLM: v1 answers "transfer" (what the teacher says), v2 answers ``canary_answer``."""
    def reply(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(("load_lora_adapter", "unload_lora_adapter")):
            return httpx.Response(200, text="ok")
        response = _student_reply(request)
        if json.loads(request.content)["model"].endswith("@v2"):  # whole answer or stream alike
            return httpx.Response(200, text=response.text.replace(STUDENT_ANSWER, canary_answer),
                                  headers={"content-type": response.headers["content-type"]})
        return response
    return reply


@pytest.fixture
def canary_settings(make_settings: Callable[..., Settings], replay_teacher: str, monkeypatch: pytest.MonkeyPatch,
                    tmp_path: Path) -> Settings:
    monkeypatch.setenv("DISTILLGATE_ADMIN_TOKEN", "admin-secret")
    settings = make_settings(replay_teacher, route={
        "ood_threshold": 0.5,
        "rollout": {"canary_share": 0.3, "min_evidence": 10, "tolerance": 0.3, "seed": 1}})
    store = SQLiteStore(settings.store.path)
    for version in ("v1", "v2"):
        Registry(store).record(CandidateVersion(ROUTE, version, "candidate", fake_adapter(tmp_path / version)))
    store.close()
    return settings


def _gateway(settings: Settings, canary_answer: str) -> UvicornThread:
    student = VLLMStudent("http://vllm.test", transport=httpx.MockTransport(_vllm(canary_answer)))
    return UvicornThread(create_app(settings, Components(student=student, router=ScoringRouter())))


def _start(url: str) -> None:
    assert httpx.post(f"{url}{BASE}/promote", headers=ADMIN, json={"version": "v1"}).status_code == 200
    started = httpx.post(f"{url}{BASE}/canary", headers=ADMIN, json={"version": "v2"})
    assert started.status_code == 200, started.text
    assert started.json()["canary"]["version"] == "v2" and started.json()["student_version"] == "v1"


def _traffic_until_ended(url: str, max_requests: int = 400) -> list[str]:
    """Student-eligible requests until the canary ends; the version that answered each."""
    client, versions = sdk(url), []
    for index in range(max_requests):
        stream = index % 3 == 2  # streamed answers are split, shadowed and counted the same way
        raw = client.chat.completions.with_raw_response.create(
            model=ROUTE, messages=[{"role": "user", "content": TRANSFERS[index % len(TRANSFERS)]}], max_tokens=4,
            stream=stream)
        if stream:
            assert "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
        versions.append(raw.headers["x-distillgate-student-version"])
        if index % 10 == 9 and _route(url)["canary"] is None:
            return versions
        time.sleep(0.01)  # let the shadow runner keep up
    return versions


def _route(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}{BASE}", headers=ADMIN).json()


def _audit(url: str) -> list[dict[str, Any]]:
    return list(reversed(httpx.get(f"{url}{BASE}/audit", headers=ADMIN).json()["data"]))


def test_a_worse_canary_is_rolled_back_with_its_evidence(canary_settings: Settings) -> None:
    with _gateway(canary_settings, canary_answer="timer") as server:
        _start(server.url)
        running_page = httpx.get(f"{server.url}/dashboard/routes/{ROUTE}", headers=ADMIN).text
        versions = _traffic_until_ended(server.url)
        route = _route(server.url)
        ended_page = httpx.get(f"{server.url}/dashboard/routes/{ROUTE}", headers=ADMIN).text
        metrics = httpx.get(f"{server.url}/metrics").text
        events = _audit(server.url)
        listed = httpx.get(f"{server.url}/admin/routes", headers=ADMIN).json()["data"][0]
    assert route["canary"] is None and route["student_version"] == "v1"
    assert '<b id="canary-version">v2</b>' in running_page
    assert '<b id="canary-last">rollback</b>' in ended_page and "none running" in ended_page
    share = versions.count("v2") / len(versions)
    assert 0.1 < share < 0.5, (share, len(versions))  # about the canary's 0.3
    assert set(versions) == {"v1", "v2"}
    last = route["rollout"]["last"]
    assert last["action"] == "rollback" and last["actor"] == "canary"
    assert last["verdict"]["canary_upper"] < last["verdict"]["live_agreement"] - 0.3
    assert last["canary"]["agreed"] == 0 and last["canary"]["compared"] >= 10 and last["live"]["agreement"] == 1.0
    assert listed["rollout"]["last"]["action"] == "rollback"
    actions = [event["field"] for event in events]
    assert actions[-2:] == ["canary_start", "canary_rollback"], actions
    assert json.loads(events[-1]["new_json"])["canary"]["served"] == last["canary"]["served"]
    store = SQLiteStore(canary_settings.store.path)
    status = {row["version"]: row["status"] for row in store.versions(ROUTE)}
    shadow_versions = {row["student_version"] for row in store.query("select student_version from shadow_results")}
    store.close()
    assert status == {"v1": "live", "v2": "rejected"}
    assert shadow_versions == {"v1", "v2"}  # each comparison is credited to the version that answered
    assert 'distillgate_canary_decisions_total{action="rollback",route="clinc-intents"} 1.0' in metrics


def test_an_equal_canary_is_promoted_and_serves_everything(canary_settings: Settings) -> None:
    with _gateway(canary_settings, canary_answer="transfer") as server:
        _start(server.url)
        _traffic_until_ended(server.url)
        route = _route(server.url)
        after = sdk(server.url).chat.completions.with_raw_response.create(
            model=ROUTE, messages=[{"role": "user", "content": TRANSFERS[0]}], max_tokens=4)
    assert route["canary"] is None and route["student_version"] == "v2"
    assert route["rollout"]["last"]["action"] == "promote"
    assert route["rollout"]["last"]["verdict"]["canary_lower"] >= 1.0 - 0.3
    assert after.headers["x-distillgate-student-version"] == "v2" and "x-distillgate-canary" not in after.headers


def test_manual_rollback_and_promote_end_a_canary(canary_settings: Settings) -> None:
    with _gateway(canary_settings, canary_answer="timer") as server:
        _start(server.url)
        missing = httpx.post(f"{server.url}{BASE}/canary", headers=ADMIN, json={"version": "v9"})
        unnamed = httpx.post(f"{server.url}{BASE}/canary", headers=ADMIN, json={})
        second = httpx.post(f"{server.url}{BASE}/canary", headers=ADMIN, json={"version": "v1"})
        assert (missing.status_code, unnamed.status_code, second.status_code) == (404, 400, 409)
        assert unnamed.json()["error"]["param"] == "version" and "already runs a canary" in second.json()["error"]["message"]
        rolled = httpx.post(f"{server.url}{BASE}/rollback", headers=ADMIN)
        assert rolled.status_code == 200 and rolled.json()["canary"] is None
        assert rolled.json()["student_version"] == "v1"  # rolling back during a canary rolls back the canary
        refused = httpx.post(f"{server.url}{BASE}/canary", headers=ADMIN, json={"version": "v2"})
        assert refused.status_code == 409  # a rolled-back canary is rejected
        forced = httpx.post(f"{server.url}{BASE}/promote", headers=ADMIN, json={"version": "v2", "force": True})
        assert forced.status_code == 200 and forced.json()["student_version"] == "v2"
        events = [event["field"] for event in _audit(server.url)]
    assert events == ["promote", "canary_start", "canary_start", "canary_rollback", "rollback", "canary_start",
                      "promote --force"]  # the refused starts are audited too


def test_thumbs_down_on_canary_answers_rolls_it_back(canary_settings: Settings) -> None:
    """The canary agrees with the teacher, but clients rate its answers down: feedback blocks it."""
    with _gateway(canary_settings, canary_answer="transfer") as server:
        _start(server.url)
        client, rated = sdk(server.url), 0
        for index in range(40):
            raw = client.chat.completions.with_raw_response.create(
                model=ROUTE, messages=[{"role": "user", "content": TRANSFERS[index % len(TRANSFERS)]}], max_tokens=4)
            if raw.headers["x-distillgate-student-version"] == "v2" and rated < 3:
                feedback = httpx.post(f"{server.url}/v1/feedback", json={"request_id": raw.parse().id, "rating": "down"})
                assert feedback.status_code == 200, feedback.text
                rated += 1
        deadline = time.monotonic() + 10
        while _route(server.url)["canary"] is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        route = _route(server.url)
    assert rated == 3
    last = route["rollout"]["last"]
    assert route["canary"] is None and last["action"] == "rollback", last
    assert "negative feedback" in last["verdict"]["reason"] and last["canary"]["negative_feedback"] == 3
    store = SQLiteStore(canary_settings.store.path)  # what the demo's report reads
    [canary], totals = canary_tally(store), feedback_totals(store)
    store.close()
    assert (canary["version"], canary["outcome"], canary["live_version"]) == ("v2", "rollback", "v1")
    assert canary["served"] == canary["saw"] >= last["canary"]["served"] >= 3
    assert canary["feedback"] == {"feedback": 3, "thumbs_down": 3, "thumbs_up": 0, "low_scores": 0}
    assert totals["thumbs_down"] == totals["on_student_answers"] == 3


class _Swapper:
    """Loads and unloads nothing; records how each canary ended."""

    def __init__(self) -> None:
        self.unloaded: list[tuple[str, str]] = []

    async def load_canary(self, route: str, version: str) -> Any:
        from gateway.route_table import StudentPointer

        return StudentPointer(version, f"{route}@{version}", -0.2)

    async def unload_canary(self, route: str, pointer: Any, status: str, note: str) -> bool:
        self.unloaded.append((pointer.version, status))
        return True


async def test_a_student_server_restart_ends_a_canary_unjudged(canary_settings: Settings) -> None:
    """vLLM forgets runtime-loaded adapters when it restarts: the canary ends, its version a candidate again."""
    from gateway.route_table import RouteTable, StudentPointer
    from gateway.training.canary import CanaryRollouts

    store = SQLiteStore(canary_settings.store.path)
    routes, swapper = RouteTable(canary_settings, store), _Swapper()
    routes.switch_student(ROUTE, StudentPointer("v1", f"{ROUTE}@v1", -0.1))
    canaries = CanaryRollouts(routes, swapper, store)  # type: ignore[arg-type]
    run = await canaries.begin(ROUTE, "v2")
    assert run.version == "v2"
    assert await canaries.abandon_all("student server restart") == [ROUTE]
    audit = [row["field"] for row in reversed(store.route_audit(ROUTE))]
    store.close()
    assert routes.get(ROUTE).canary is None and swapper.unloaded == [("v2", "candidate")]
    assert audit == ["canary_start", "canary_abandon"] and canaries.status(ROUTE)["last"]["actor"] == \
        "student server restart"


def test_the_canary_answers_under_its_own_calibrated_cascade_threshold(
        make_settings: Callable[..., Settings], replay_teacher: str, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """Every student answer scores -0.3. The canary (v2, calibrated -0.01) may not serve it, so
    its requests go to the teacher, judged against -0.01: not live's -0.9 nor the route's -0.5,
    under either of which it would have served."""
    monkeypatch.setenv("DISTILLGATE_ADMIN_TOKEN", "admin-secret")
    settings = make_settings(replay_teacher, route={
        "confidence_threshold": -0.5, "cascade": {"target_agreement": 0.9},
        "rollout": {"canary_share": 0.3, "min_evidence": 1000, "seed": 1}})
    store = SQLiteStore(settings.store.path)
    for version, threshold in (("v1", -0.9), ("v2", -0.01)):
        Registry(store).record(CandidateVersion(ROUTE, version, "candidate", fake_adapter(tmp_path / version),
                                                metrics={"candidate": {"confidence_threshold": threshold}}))
    store.close()

    def vllm(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(("load_lora_adapter", "unload_lora_adapter")):
            return httpx.Response(200, text="ok")
        return completion_with_logprob(json.loads(request.content)["model"], -0.3, "transfer")

    student = VLLMStudent("http://vllm.test", transport=httpx.MockTransport(vllm))
    served: dict[str, set[str]] = {"v1": set(), "v2": set()}
    with UvicornThread(create_app(settings, Components(student=student, router=ScoringRouter()))) as server:
        _start(server.url)
        for index in range(30):
            raw = sdk(server.url).chat.completions.with_raw_response.create(
                model=ROUTE, messages=[{"role": "user", "content": TRANSFERS[index % len(TRANSFERS)]}], max_tokens=4)
            served[raw.headers["x-distillgate-student-version"]].add(raw.headers["x-distillgate-target"])
    assert served == {"v1": {"student"}, "v2": {"teacher"}}
    reasons = [json.loads(row["decision_reasons"]) for row in log_rows(settings, 30) if row["student_version"] == "v2"]
    assert reasons and all("cascade: score -0.300 < confidence_threshold -0.01" in reason for reason in reasons)


async def test_a_canary_without_evidence_is_rolled_back_when_it_times_out(canary_settings: Settings) -> None:
    from gateway.route_table import RouteTable, StudentPointer
    from gateway.training.canary import CanaryRollouts

    store = SQLiteStore(canary_settings.store.path)
    routes, swapper, now = RouteTable(canary_settings, store), _Swapper(), [1000.0]
    routes.switch_student(ROUTE, StudentPointer("v1", f"{ROUTE}@v1"))
    canaries = CanaryRollouts(routes, swapper, store, clock=lambda: now[0])  # type: ignore[arg-type]
    run = await canaries.begin(ROUTE, "v2")
    run.started_at = now[0]
    run.canary.compared, run.live.compared, run.live.agreed = 5, 50, 45
    assert await canaries.check(ROUTE) is None  # no look due, not timed out: nothing to decide
    now[0] += 60 * 60  # max_duration_minutes
    verdict = await canaries.check(ROUTE)
    store.close()
    assert verdict is not None and verdict.action == "rollback" and "timed out with too little evidence" in verdict.reason
    assert routes.get(ROUTE).canary is None and swapper.unloaded == [("v2", "rejected")]


async def test_an_answer_finishing_while_the_canary_drains_counts_in_its_ending(canary_settings: Settings) -> None:
    """The rollback stops new requests picking the canary, then drains the ones that did: an
    answer that completes during the drain is the canary's and its audited evidence says so."""
    from gateway.chat.record import RequestRecord
    from gateway.route_table import RouteTable, StudentPointer
    from gateway.training.canary import CanaryRollouts

    class _DrainingSwapper(_Swapper):
        async def unload_canary(self, route: str, pointer: Any, status: str, note: str) -> bool:
            late = RequestRecord(route=route, request={}, stream=False, client_key_id=None, target="student",
                                 student_version=pointer.version)
            canaries.observe_request(late)  # in flight when the rollback began, done during the drain
            return await super().unload_canary(route, pointer, status, note)

    store = SQLiteStore(canary_settings.store.path)
    routes = RouteTable(canary_settings, store)
    routes.switch_student(ROUTE, StudentPointer("v1", f"{ROUTE}@v1", -0.1))
    canaries = CanaryRollouts(routes, _DrainingSwapper(), store)  # type: ignore[arg-type]
    run = await canaries.begin(ROUTE, "v2")
    run.canary.served = 4
    outcome = await canaries.rollback(ROUTE, "operator")
    audited = json.loads(store.route_audit(ROUTE)[0]["new_json"])
    store.close()
    assert outcome["canary"]["served"] == audited["canary"]["served"] == 5
    canaries.observe_request(RequestRecord(route=ROUTE, request={}, stream=False, client_key_id=None,
                                           target="student", student_version="v2"))
    assert run.canary.served == 5  # once ended, nothing counts for it any more
