"""The replay teacher (stand-in for a frontier API) under real uvicorn, called with the openai SDK."""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cli.harness import register
from core.answers import normalize_answer as normalize
from harness.replay_teacher import ReplayOptions, create_replay_app
from tests.helpers import UvicornThread, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
CLINC = ROOT / "data" / "clinc150" / "data_full.json"


@contextmanager
def teacher(**knobs: Any) -> Iterator[openai.OpenAI]:
    """A replay teacher with ``knobs`` on a free port, and an SDK client that never retries."""
    with UvicornThread(create_replay_app(ReplayOptions(dataset=CLINC, **knobs))) as server:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
            yield client


@pytest.fixture(scope="module")
def queries() -> list[tuple[str, str]]:
    """200 validation utterances whose text is unique in the whole dataset, with their intent."""
    splits = json.loads(CLINC.read_text())
    counts = Counter(normalize(text) for split in splits.values() for text, _ in split)
    unique = [(text, intent) for text, intent in splits["val"] if counts[normalize(text)] == 1]
    return random.Random(7).sample(unique, 200)


def ask(client: openai.OpenAI, text: str, **params: Any) -> Any:
    messages = [{"role": "system", "content": "Answer with the intent."}, {"role": "user", "content": text}]
    return client.chat.completions.create(model="replay-teacher", messages=messages, **params)


def test_non_stream_answers_the_intent_with_usage(queries: list[tuple[str, str]]) -> None:
    text, intent = queries[0]
    with teacher() as client:
        completion = ask(client, text)
        models = client.models.list()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == intent
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens > len(text.split())
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert [model.id for model in models.data] == ["replay-teacher"]
    assert "stand-in" in models.data[0].owned_by


def test_unknown_utterance_is_out_of_scope_and_lookup_is_normalized(queries: list[tuple[str, str]]) -> None:
    text, intent = queries[1]
    with teacher() as client:
        assert ask(client, "zzqx never seen before utterance").choices[0].message.content == "oos"
        assert ask(client, f"  {text.upper()}?  ").choices[0].message.content == intent


def test_stream_chunks_end_with_usage(queries: list[tuple[str, str]]) -> None:
    text, intent = queries[2]
    with teacher() as client:
        chunks = list(ask(client, text, stream=True, stream_options={"include_usage": True}))
        plain = list(ask(client, text, stream=True))
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert content == intent
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(chunk.usage is None for chunk in plain)


def test_stream_ends_with_done_sentinel(queries: list[tuple[str, str]]) -> None:
    body = {"model": "replay-teacher", "stream": True, "messages": [{"role": "user", "content": queries[0][0]}]}
    with UvicornThread(create_replay_app(ReplayOptions(dataset=CLINC))) as server:
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    events = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "data: [DONE]"


def test_logprobs_are_plausible(queries: list[tuple[str, str]]) -> None:
    with teacher() as client:
        completion = ask(client, queries[3][0], logprobs=True, top_logprobs=3, max_tokens=50)
    content = completion.choices[0].logprobs.content
    assert "".join(token.token for token in content) == completion.choices[0].message.content
    for token in content:
        assert token.logprob <= 0
        assert len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token == token.token
        assert sum(2.718281828 ** alt.logprob for alt in token.top_logprobs) <= 1.0 + 1e-9


def test_max_tokens_truncates_with_length_finish(queries: list[tuple[str, str]]) -> None:
    text, intent = next((t, i) for t, i in queries if "_" in i)
    with teacher() as client:
        completion = ask(client, text, max_tokens=1)
    assert completion.choices[0].finish_reason == "length"
    assert intent.startswith(completion.choices[0].message.content)
    assert completion.usage.completion_tokens == 1


def wrong_share(client: openai.OpenAI, queries: list[tuple[str, str]]) -> tuple[float, list[str]]:
    answers = [ask(client, text).choices[0].message.content for text, _ in queries]
    wrong = sum(answer != intent for answer, (_, intent) in zip(answers, queries, strict=True))
    return wrong / len(queries), answers


def test_accuracy_knob(queries: list[tuple[str, str]]) -> None:
    with teacher(accuracy=1.0) as client:
        assert wrong_share(client, queries)[0] == 0.0
    with teacher(accuracy=0.5, seed=3) as client:
        share, answers = wrong_share(client, queries)
    assert 0.35 <= share <= 0.65
    # Mistakes are a function of (seed, utterance): a rerun reproduces them, another seed differs.
    with teacher(accuracy=0.5, seed=3) as client:
        assert wrong_share(client, queries)[1] == answers
    with teacher(accuracy=0.5, seed=4) as client:
        assert wrong_share(client, queries)[1] != answers


def test_error_rate_one_always_fails_in_openai_error_shape(queries: list[tuple[str, str]]) -> None:
    statuses = Counter()
    with teacher(error_rate=1.0) as client:
        for text, _ in queries[:40]:
            with pytest.raises(openai.APIStatusError) as caught:
                ask(client, text)
            error = caught.value
            statuses[error.status_code] += 1
            assert set(error.body) >= {"message", "type", "code"}  # the SDK unwraps {"error": ...}
            if error.status_code == 429:
                assert isinstance(error, openai.RateLimitError)
                assert float(error.response.headers["retry-after"]) > 0
            else:
                assert isinstance(error, openai.InternalServerError)
    assert set(statuses) == {429, 500}


def test_error_rate_fraction(queries: list[tuple[str, str]]) -> None:
    failures = 0
    with teacher(error_rate=0.3, seed=11) as client:
        for text, _ in queries:
            try:
                ask(client, text)
            except openai.APIStatusError:
                failures += 1
    assert 0.2 <= failures / len(queries) <= 0.4


def timed_calls(client: openai.OpenAI, queries: list[tuple[str, str]], count: int) -> list[float]:
    durations = []
    for text, _ in queries[:count]:
        started = time.perf_counter()
        ask(client, text)
        durations.append(time.perf_counter() - started)
    return durations


def test_latency_knob(queries: list[tuple[str, str]]) -> None:
    with teacher(latency_ms=150) as client:
        fixed = timed_calls(client, queries, 5)
    with teacher(latency_ms=150, latency_jitter_ms=80, seed=5) as client:
        jittered = timed_calls(client, queries, 20)
    with teacher() as client:
        fast = timed_calls(client, queries, 5)
    assert min(fixed) >= 0.15
    assert max(fast) < 0.15
    assert 0.1 <= sorted(jittered)[10] <= 0.3  # median near the mean (lognormal, right-skewed)
    assert max(jittered) - min(jittered) > 0.05


def test_invalid_request_is_a_400_in_openai_shape() -> None:
    with teacher() as client:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="replay-teacher", messages=[])
    assert caught.value.body["type"] == "invalid_request_error"


def test_replay_teacher_command_serves(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["replay-teacher", "--port", "1234", "--accuracy", "0.9", "--error-rate", "0.1"])
    assert (args.port, args.accuracy, args.error_rate, args.dataset.name) == (1234, 0.9, 0.1, "data_full.json")

    port = free_port()
    command = [sys.executable, "-m", "cli.main", "replay-teacher", "--dataset", str(CLINC), "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "replay-teacher command did not come up"
                time.sleep(0.2)
        assert health.json()["status"] == "ok"
    finally:
        process.terminate()
        process.wait(timeout=10)
