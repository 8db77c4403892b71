"""The replay teacher answers a request offering tools with OpenAI ``tool_calls``: real
uvicorn, the official openai SDK, streamed and not, every ``tool_choice``, noise included."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from harness.replay_teacher import ReplayOptions, create_replay_app
from tests.helpers import UvicornThread

pytestmark = pytest.mark.integration

CLINC = Path(__file__).resolve().parents[1] / "data" / "clinc150" / "data_full.json"
INTENTS = ["balance", "book_flight", "transfer", "timer"]
TOOLS: Any = [{"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}
              for name in INTENTS]
TOOLS[3]["function"]["parameters"]["properties"] = {"minutes": {"type": "integer"}, "label": {"type": "string"}}


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    with UvicornThread(create_replay_app(ReplayOptions(dataset=CLINC))) as server:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as sdk:
            yield sdk


def _utterances(intent: str, count: int = 5) -> list[str]:
    return [text for text, label in json.loads(CLINC.read_text())["train"] if label == intent][:count]


def _ask(sdk: openai.OpenAI, text: str, **extra: Any) -> Any:
    return sdk.chat.completions.create(model="replay-teacher", tools=TOOLS,
                                       messages=[{"role": "user", "content": text}], **extra).choices[0]


def test_offered_intent_is_called_with_derived_arguments(client: openai.OpenAI) -> None:
    for intent in ("balance", "book_flight", "transfer"):
        for text in _utterances(intent):
            choice = _ask(client, text)
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            call = choice.message.tool_calls[0]
            assert (call.function.name, json.loads(call.function.arguments)) == (intent, {})
    # Arguments come from the tool's declared properties: an integer one takes the utterance's number.
    choice = _ask(client, "set a timer for 25 minutes please",
                  tool_choice={"type": "function", "function": {"name": "timer"}})
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"minutes": 25}


def test_tool_choice_and_out_of_scope(client: openai.OpenAI) -> None:
    oos = json.loads(CLINC.read_text())["oos_train"][0][0]
    weather = _utterances("weather", 1)[0]
    # auto: an utterance that fits no offered tool gets a text answer (its label, oos) and no call
    assert (_ask(client, oos).message.content, _ask(client, oos).message.tool_calls) == ("oos", None)
    assert _ask(client, weather).message.content == "weather"
    # none: the label as text, as without tools
    balance = _utterances("balance", 1)[0]
    assert _ask(client, balance, tool_choice="none").message.content == "balance"
    # required: always a call, to an offered tool
    assert _ask(client, oos, tool_choice="required").message.tool_calls[0].function.name in INTENTS
    # a named function: that one, whatever the utterance
    forced = _ask(client, balance, tool_choice={"type": "function", "function": {"name": "transfer"}})
    assert forced.message.tool_calls[0].function.name == "transfer"


def test_streamed_tool_calls_parse(client: openai.OpenAI) -> None:
    text = _utterances("book_flight", 1)[0]
    stream = client.chat.completions.create(model="replay-teacher", tools=TOOLS, stream=True,
                                            messages=[{"role": "user", "content": text}])
    names, arguments, finish = "", "", None
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                names += call.function.name or ""
                arguments += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert (names, json.loads(arguments), finish) == ("book_flight", {}, "tool_calls")


def test_noise_is_consistent_and_stays_among_offered_tools() -> None:
    with UvicornThread(create_replay_app(ReplayOptions(dataset=CLINC, accuracy=0.5, seed=3))) as server:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as sdk:
            texts = [text for intent in INTENTS[:3] for text in _utterances(intent, 10)]
            first = [_answer(_ask(sdk, text)) for text in texts]
            again = [_answer(_ask(sdk, text)) for text in texts]
            plain = [sdk.chat.completions.create(model="replay-teacher", messages=[{"role": "user", "content": text}])
                     .choices[0].message.content for text in texts]
    assert first == again  # a pure function of (seed, utterance)
    assert set(first) <= {*INTENTS, "oos"}  # a wrong answer is an offered tool or no call
    truth = [intent for intent in INTENTS[:3] for _ in range(10)]
    wrong_with_tools = {index for index, answer in enumerate(first) if answer != truth[index]}
    wrong_plain = {index for index, answer in enumerate(plain) if answer != truth[index]}
    assert wrong_with_tools == wrong_plain and 5 <= len(wrong_plain) <= 25  # the same utterances are wrong


def _answer(choice: Any) -> str:
    return choice.message.tool_calls[0].function.name if choice.message.tool_calls else choice.message.content
