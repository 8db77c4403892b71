"""The demo's traffic: CLINC150 queries sent through the gateway with the official SDK.

The app's system prompt is long (it lists every intent, as a real app instructing a frontier
model would); the teacher pays for it on every request, the student never sees it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import openai

OUT_OF_SCOPE = "oos"
T = TypeVar("T")


@dataclass(frozen=True)
class Query:
    text: str
    label: str

    @property
    def in_scope(self) -> bool:
        return self.label != OUT_OF_SCOPE


@dataclass
class Outcome:
    index: int
    query: Query
    answer: str | None
    target: str | None
    student_version: str | None
    request_id: str | None
    latency_ms: float
    error: str | None = None
    # Wall-clock time the request was sent: places promotions and training runs on the stream.
    sent_at: float = 0.0

    @property
    def correct(self) -> bool:
        return self.answer is not None and self.answer.strip().lower() == self.query.label


def load_splits(path: Path) -> dict[str, list[Query]]:
    data = json.loads(Path(path).read_text())
    return {split: [Query(text, label) for text, label in pairs] for split, pairs in data.items()}


def load_domains(dataset: Path) -> dict[str, list[str]] | None:
    """CLINC150's domains (``domains.json`` beside the dataset): ten of 15 intents each."""
    path = Path(dataset).with_name("domains.json")
    return json.loads(path.read_text()) if path.exists() else None


def app_system_prompt(labels: list[str]) -> str:
    return (
        "You are the intent classifier of a banking, travel and home assistant. Read the customer's "
        "utterance and answer with exactly one intent label from this list, and nothing else. If the "
        "utterance fits none of them, answer oos.\nLabels: " + ", ".join(sorted(labels))
    )


def demo_intents(splits: dict[str, list[Query]], count: int | None, seed: int) -> list[str]:
    """The in-scope intents of the demo's app: all of CLINC150's, or ``count`` of them chosen by seed."""
    labels = sorted({query.label for query in splits["train"]})
    if count is None or count >= len(labels):
        return labels
    return sorted(random.Random(f"{seed}:intents").sample(labels, count))


def held_back_intents(intents: list[str], share: float, seed: int,
                      domains: dict[str, list[str]] | None = None) -> list[str]:
    """The intents the shift phase holds back until its request: about ``share`` of them (at
    least one, never all). Whole CLINC150 domains at a time when ``domains`` is given (a new
    feature of an app brings a new kind of question: 2 of 10 domains are 20 % of the
    intents), else single intents; chosen by seed."""
    target = min(len(intents) - 1, max(1, round(share * len(intents))))
    rng = random.Random(f"{seed}:held-back")
    groups = [[intent for intent in domains[name] if intent in intents] for name in sorted(domains or {})]
    groups = [group for group in groups if group] or [[intent] for intent in sorted(intents)]
    if max(len(group) for group in groups) > target:  # domains too coarse for this share: single intents
        groups = [[intent] for intent in sorted(intents)]
    rng.shuffle(groups)
    held: list[str] = []
    for group in groups:
        if len(held) + len(group) > target:
            continue
        held += group
    return sorted(held)


def traffic_stream(splits: dict[str, list[Query]], requests: int, oos_rate: float, seed: int, *,
                   intents: Collection[str] | None = None, held_back: Collection[str] = (),
                   shift_at: int | None = None) -> list[Query]:
    """Shuffled in-scope training utterances with out-of-scope ones mixed in at ``oos_rate``.

    ``intents``: only these in-scope intents (None: all). ``held_back`` intents are left out of
    the requests before index ``shift_at`` (0-based) and join the mix from it on, at their
    natural share: the shift phase. Without either the stream is the same as it always was."""
    rng = random.Random(seed)
    in_scope = [query for query in splits["train"] if intents is None or query.label in intents]
    out_of_scope = list(splits.get("oos_train", [])) + list(splits.get("oos_val", []))
    rng.shuffle(in_scope)
    rng.shuffle(out_of_scope)
    before = [query for query in in_scope if query.label not in held_back] if shift_at is not None else in_scope
    in_scope_before, in_scope_after = itertools.cycle(before), itertools.cycle(in_scope)
    out_of_scope_cycle = itertools.cycle(out_of_scope)
    stream = []
    for index in range(requests):
        in_scope_cycle = in_scope_after if shift_at is not None and index >= shift_at else in_scope_before
        stream.append(next(out_of_scope_cycle) if out_of_scope and rng.random() < oos_rate else next(in_scope_cycle))
    return stream


def heldout_queries(splits: dict[str, list[Query]], limit: int | None, seed: int,
                    intents: Collection[str] | None = None) -> list[Query]:
    """CLINC150's test + oos_test (never used as traffic; only the demo's ``intents`` when
    given), subsampled evenly when limited."""
    test = [query for query in splits["test"] if intents is None or query.label in intents]
    oos_test = list(splits["oos_test"])
    if limit is not None and limit < len(test) + len(oos_test):
        rng = random.Random(seed)
        share = len(oos_test) / (len(test) + len(oos_test))
        oos_count = max(1, round(limit * share))
        test, oos_test = rng.sample(test, limit - oos_count), rng.sample(oos_test, oos_count)
    return test + oos_test


async def _send_one(client: openai.AsyncOpenAI, route: str, system_prompt: str, index: int,
                    query: Query) -> Outcome:
    sent_at, started = time.time(), time.perf_counter()
    messages: list[Any] = [{"role": "system", "content": system_prompt}, {"role": "user", "content": query.text}]
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=route, messages=messages, temperature=0, max_tokens=16)
    except openai.APIError as error:
        return Outcome(index, query, None, None, None, None, (time.perf_counter() - started) * 1000,
                       error=f"{type(error).__name__}: {error}", sent_at=sent_at)
    completion = raw.parse()
    return Outcome(
        index, query, completion.choices[0].message.content or "", raw.headers.get("x-distillgate-target"),
        raw.headers.get("x-distillgate-student-version"), raw.headers.get("x-request-id"),
        (time.perf_counter() - started) * 1000, sent_at=sent_at,
    )


async def send_all(client: openai.AsyncOpenAI, route: str, system_prompt: str, queries: list[Query],
                   concurrency: int, on_outcome: Callable[[Outcome], None] | None = None,
                   rate_per_s: float | None = None) -> list[Outcome]:
    """Send every query with at most ``concurrency`` in flight and, when ``rate_per_s`` is set,
    at that arrival rate (traffic spread over time, as an app's is); outcomes in query order."""
    async def send(index: int, query: Query) -> Outcome:
        return await _send_one(client, route, system_prompt, index, query)

    return await paced(queries, send, concurrency, rate_per_s, on_outcome)


async def paced(queries: list[Query], send: Callable[[int, Query], Awaitable[T]], concurrency: int,
                rate_per_s: float | None = None, on_outcome: Callable[[T], None] | None = None) -> list[T]:
    """``send`` each query, at most ``concurrency`` in flight, at ``rate_per_s`` (None: as fast
    as they go); results in query order."""
    outcomes: list[T | None] = [None] * len(queries)
    cursor = iter(enumerate(queries))
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def worker() -> None:
        for index, query in cursor:
            if rate_per_s:
                await asyncio.sleep(max(0.0, started + index / rate_per_s - loop.time()))
            outcome = await send(index, query)
            outcomes[index] = outcome
            if on_outcome:
                on_outcome(outcome)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [outcome for outcome in outcomes if outcome is not None]
