"""``/v1/completions`` and ``/v1/embeddings``: forwarded to the route's teacher provider
through litellm (here the replay teacher), logged with cost, never trained on."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from core.config import Settings
from core.store import SQLiteStore
from gateway.app import create_app
from harness.replay_passthrough import hashed_embedding
from tests.helpers import UTTERANCE, UvicornThread, free_port, log_rows, sdk
from trainer.dataset import collect_examples, count_new_examples

ROUTE = "clinc-intents"
EMBEDDING_ROUTE = {"teacher": {"embedding_model": "openai/replay-embedding", "embedding_input_per_mtok": 0.5}}


@pytest.fixture
def gateway(make_settings: Callable[..., Settings], replay_teacher: str) -> Iterator[tuple[str, Settings]]:
    settings = make_settings(replay_teacher, route=EMBEDDING_ROUTE)
    with UvicornThread(create_app(settings)) as server:
        yield server.url, settings


def test_completions_are_forwarded_and_logged_with_cost(gateway: tuple[str, Settings]) -> None:
    url, settings = gateway
    raw = sdk(url).completions.with_raw_response.create(model=ROUTE, prompt=UTTERANCE, max_tokens=8)
    completion = raw.parse()
    assert completion.model == ROUTE and completion.choices[0].text == "transfer"
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    assert raw.headers["x-distillgate-target"] == "passthrough"
    [row] = log_rows(settings, 1)
    assert (row["target"], row["status_code"], row["stream"]) == ("passthrough", 200, 0)
    assert row["cost_usd"] > 0 and row["cost_usd"] == pytest.approx(row["teacher_cost_usd"])
    assert json.loads(row["request_json"])["prompt"] == UTTERANCE
    store = SQLiteStore(settings.store.path)
    assert collect_examples(store, settings.routes[0])[0] == []  # not distilled
    assert count_new_examples(store, ROUTE, 0.0) == 0  # and no retraining trigger


def test_embeddings_are_forwarded_in_both_encodings(gateway: tuple[str, Settings]) -> None:
    url, settings = gateway
    texts = [UTTERANCE, "what is my balance"]
    decoded = sdk(url).embeddings.create(model=ROUTE, input=texts)  # the SDK asks for base64 and decodes it
    plain = httpx.post(f"{url}/v1/embeddings", json={"model": ROUTE, "input": texts, "encoding_format": "float"})
    assert plain.status_code == 200 and plain.json()["model"] == ROUTE
    for index, text in enumerate(texts):
        expected = hashed_embedding(text, 64)
        assert decoded.data[index].embedding == pytest.approx(expected, abs=1e-6)
        assert plain.json()["data"][index]["embedding"] == pytest.approx(expected)
    rows = log_rows(settings, 2)
    assert all(row["target"] == "passthrough" and row["teacher_model"] == "openai/replay-embedding" for row in rows)
    assert rows[0]["cost_usd"] == pytest.approx(rows[0]["prompt_tokens"] * 0.5 / 1e6) and rows[0]["cost_usd"] > 0


def test_a_route_without_an_embedding_model_refuses_embeddings(make_settings: Callable[..., Settings],
                                                                replay_teacher: str) -> None:
    with UvicornThread(create_app(make_settings(replay_teacher))) as server:
        with pytest.raises(openai.BadRequestError) as refused:
            sdk(server.url).embeddings.create(model=ROUTE, input="hello")
    assert refused.value.param == "model" and "embedding_model" in refused.value.message


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/completions", {"model": ROUTE}, 400, "prompt"),
        ("/v1/completions", {"model": ROUTE, "prompt": "x", "stream": True}, 400, "stream"),
        ("/v1/completions", {"model": ROUTE, "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
        ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
        ("/v1/embeddings", {"model": ROUTE, "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ("/v1/embeddings", {"model": "nope", "input": "x"}, 404, "model"),
    ],
)
def test_bad_requests_get_openai_errors(gateway: tuple[str, Settings], path: str, body: dict[str, object],
                                        status: int, param: str) -> None:
    url, _ = gateway
    response = httpx.post(f"{url}{path}", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param


def test_provider_unreachable_is_502_and_logged(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(f"http://127.0.0.1:{free_port()}", route=EMBEDDING_ROUTE)
    with UvicornThread(create_app(settings)) as server:
        with pytest.raises(openai.InternalServerError) as failure:
            sdk(server.url).completions.create(model=ROUTE, prompt=UTTERANCE)
    assert failure.value.status_code == 502
    [row] = log_rows(settings, 1)
    assert (row["target"], row["status_code"]) == ("passthrough", 502)
