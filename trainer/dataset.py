"""A route's training data, curated from the teacher answers the gateway logged.

Sources: requests the teacher answered (``target == "teacher"``, status 200) and shadow
results (teacher answers to student-served requests); a tool-calling answer's target is its
calls written as JSON (core/tool_calls.py). Dropped, with a count per reason:
rows from keys not trusted for training (``untrusted_key``: any other key could plant
answers the student then serves to everyone), rows carrying a client system prompt unless
the route's ``training.client_system_prompts`` is ``replace`` (``client_system_prompt``: it
steered the teacher, but the student never sees it), errors, empty or truncated answers,
refusals, answers failing the route's validity check (label routes: one of the known labels;
``response_format`` JSON requests: must parse, and match the request's JSON schema when it
gives one) and duplicate prompts (the newest answer wins:
a teacher upgrade should win over stale data).

Corrections (``POST /v1/feedback``) from keys trusted for training replace the logged answer
as the target, the newest correction of a request winning; a corrected student answer that
was never shadowed becomes an example too (``source="correction"``). A corrected example is
dated by its correction, and wins over an uncorrected answer to the same prompt whatever
their dates: a person said what the answer is. A correction goes through the same validity
checks as a teacher answer; an unfit one drops the row (``correction_<reason>``), since the
person said the logged answer was wrong.

The holdout is fixed and grows with the data: an example's split is a pure function of a
hash of its prompt, so it never moves between splits, and every candidate and the live
student are compared on the same examples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from core.answers import normalize_answer, strip_reasoning
from core.config import RouteConfig
from core.prompting import student_messages, user_text
from core.store import Store
from core.tool_calls import tool_calls_text

logger = logging.getLogger(__name__)

# Phrases that open a refusal; a distilled student must not learn to refuse in-scope work.
_REFUSAL = re.compile(
    r"^\s*(i'?m sorry|i am sorry|sorry, (but )?i|i can(no|')t (help|assist|do|provide|comply)|"
    r"i cannot (help|assist|do|provide|comply)|i'?m (not able|unable) to|i am (not able|unable) to|"
    r"as an ai( language model)?,? i)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Example:
    """One prompt (the student's exact serving prompt) and the teacher's answer."""

    messages: list[dict[str, Any]]
    answer: str
    prompt_text: str  # the last user message: what the router embeds and the holdout hashes
    source: str = "teacher"  # "teacher" or "shadow"
    json_request: bool = False  # the request asked for JSON (response_format): answers must parse
    request_id: str = ""
    created_at: float = 0.0
    # The teacher's per-token ``logprobs.content`` (token, logprob, top_logprobs) when logged.
    teacher_logprobs: list[dict[str, Any]] | None = None
    corrected: bool = False  # the answer is a person's correction, not the logged one


@dataclass
class Dataset:
    route: str
    train: list[Example]
    holdout: list[Example]
    dropped: Counter[str] = field(default_factory=Counter)
    newest_at: float = 0.0  # created_at of the newest example used

    def summary(self) -> dict[str, Any]:
        return {"route": self.route, "train": len(self.train), "holdout": len(self.holdout),
                "dropped": dict(self.dropped), "newest_at": self.newest_at}


def prompt_key(prompt_text: str) -> str:
    """The prompt as the holdout split sees it: whitespace runs collapsed, case folded."""
    return " ".join(prompt_text.split()).casefold()


def holdout_score(prompt_text: str) -> float:
    """A number in [0, 1) fixed by the prompt alone; below the holdout fraction means holdout."""
    digest = hashlib.sha256(prompt_key(prompt_text).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_holdout(prompt_text: str, fraction: float) -> bool:
    return holdout_score(prompt_text) < fraction


def labels_for_route(route: RouteConfig) -> set[str] | None:
    """The valid answers of a label route (``labels_dataset``'s intents), else None."""
    return labels_from_file(route.labels_dataset) if route.labels_dataset is not None else None


def labels_from_file(path: str | Path) -> set[str]:
    """Intents of a CLINC150-format file (splits of ``[utterance, intent]``), plus ``oos``."""
    splits = json.loads(Path(path).read_text())
    return {intent for rows in splits.values() for _, intent in rows} | {"oos"}


# -- validity ---------------------------------------------------------------------------------
def wants_json(request: dict[str, Any]) -> bool:
    response_format = request.get("response_format") or {}
    return isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema")


def rejection_reason(request: dict[str, Any], answer: str, finish_reason: str | None,
                     labels: Collection[str] | None) -> str | None:
    """Why this answer must not become training data, or None when it is fit."""
    if finish_reason == "length":
        return "truncated"
    text = strip_reasoning(answer)
    if not text:
        return "empty"
    if _REFUSAL.match(text):
        return "refusal"
    if labels is not None and normalize_answer(text) not in labels:
        return "invalid_label"
    if wants_json(request):
        try:
            parsed = json.loads(text)
        except ValueError:
            return "invalid_json"
        if not matches_schema(request, parsed):
            return "schema_invalid"
    return None


def matches_schema(request: dict[str, Any], value: Any) -> bool:
    """Whether ``value`` satisfies the request's ``response_format`` JSON schema (True when
    it names none, or names one that is not a valid schema: the teacher was not held to it)."""
    import jsonschema

    schema = ((request.get("response_format") or {}).get("json_schema") or {}).get("schema")
    if not isinstance(schema, dict):
        return True
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    except jsonschema.SchemaError:
        return True
    return True


# -- reading the store ------------------------------------------------------------------------
def _loads(raw: str | None) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _first_choice(response: Any) -> dict[str, Any]:
    if not isinstance(response, dict):
        return {}
    choices = response.get("choices") or [{}]
    return choices[0] if isinstance(choices[0], dict) else {}


CLIENT_SYSTEM_ROLES = ("system", "developer")


def _untrusted_reason(row: dict[str, Any], request: Any, client_system_prompts: str) -> str | None:
    """Why a row must not be trained on whatever its answer, or None."""
    if row.get("train_trusted") != 1:
        return "untrusted_key"
    if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
        return "bad_request"
    if client_system_prompts == "skip" and any(
            isinstance(message, dict) and message.get("role") in CLIENT_SYSTEM_ROLES for message in request["messages"]):
        return "client_system_prompt"
    return None


def _candidate(request: Any, response: Any, *, source: str, request_id: str, created_at: float,
               system_prompt: str, labels: Collection[str] | None, keep_reasoning: bool
               ) -> Example | str:
    """An Example, or the reason to drop this row."""
    if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
        return "bad_request"
    choice = _first_choice(response)
    message = choice.get("message") or {}
    answer = message.get("content") if isinstance(message.get("content"), str) else ""
    calls = message.get("tool_calls") if isinstance(message.get("tool_calls"), list) else None
    if calls:
        answer = tool_calls_text(calls)  # the student learns to write the teacher's calls
    if message.get("refusal"):
        return "refusal"
    reason = rejection_reason(request, answer, choice.get("finish_reason"), labels)
    if reason:
        return reason
    target = answer.strip() if keep_reasoning else strip_reasoning(answer)
    if labels is not None:
        target = normalize_answer(target)
    logprobs = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
    return Example(
        messages=student_messages(system_prompt, request["messages"], request.get("tools")),
        answer=target,
        prompt_text=user_text(request["messages"]),
        source=source,
        json_request=wants_json(request),
        request_id=request_id,
        created_at=created_at,
        # Logprobs describe the raw answer's tokens; only usable when the target is that answer.
        teacher_logprobs=logprobs if target == answer and not calls else None,
    )


def _teacher_rows(store: Store, route: str, after: float) -> Iterable[dict[str, Any]]:
    yield from store.iter_requests(route, target="teacher", after=after, ok_only=True)


def _shadow_rows(store: Store, route: str, after: float) -> Iterable[tuple[dict[str, Any], dict[str, Any]]]:
    """Shadow results joined with the logged request they shadowed."""
    shadows = list(store.iter_shadow_results(route, after=after))
    if not shadows:
        return
    wanted = {row["request_id"] for row in shadows}
    requests = {row["id"]: row for row in store.iter_requests(route, target="student", ok_only=False)
                if row["id"] in wanted}
    for shadow in shadows:
        request = requests.get(shadow["request_id"])
        if request is not None:
            yield shadow, request


def _example(request: Any, response: Any, correction: dict[str, Any] | None, *, created_at: float,
             **candidate_args: Any) -> Example | str:
    """``_candidate`` on the logged answer, or on a person's correction when there is one."""
    if correction is None:
        return _candidate(request, response, created_at=created_at, **candidate_args)
    corrected = {"choices": [{"message": {"content": correction["correction"]}, "finish_reason": "stop"}]}
    found = _candidate(request, corrected, created_at=max(created_at, correction["created_at"]), **candidate_args)
    return f"correction_{found}" if isinstance(found, str) else replace(found, corrected=True)


def _corrected_student_rows(store: Store, route: str, after: float, corrections: dict[str, dict[str, Any]],
                            seen: set[str]) -> Iterable[dict[str, Any]]:
    """Student-served requests with a correction that no teacher answer covered (not shadowed)."""
    wanted = corrections.keys() - seen
    if wanted:
        yield from (row for row in store.iter_requests(route, target="student", after=after, ok_only=True)
                    if row["id"] in wanted)


def collect_examples(store: Store, route: RouteConfig, *, labels: Collection[str] | None = None,
                     after: float = 0.0, keep_reasoning: bool = False) -> tuple[list[Example], Counter[str]]:
    """Every fit example since ``after``, deduplicated (newest answer wins), and drop counts."""
    dropped: Counter[str] = Counter()
    label_set = {normalize_answer(label) for label in labels} if labels is not None else None
    options = {"system_prompt": route.student.system_prompt, "labels": label_set, "keep_reasoning": keep_reasoning}
    policy = route.training.client_system_prompts
    corrections = store.latest_corrections(route.name)
    found: list[Example | str] = []
    seen: set[str] = set()
    for row in _teacher_rows(store, route.name, after):
        request = _loads(row["request_json"])
        seen.add(row["id"])
        found.append(_untrusted_reason(row, request, policy) or _example(
            request, _loads(row["response_json"]), corrections.get(row["id"]), source="teacher",
            request_id=row["id"], created_at=row["created_at"], **options))
    for shadow, row in _shadow_rows(store, route.name, after):
        request = _loads(row["request_json"])
        response = _loads(shadow.get("teacher_response_json"))
        if response is None and shadow.get("teacher_answer"):
            response = {"choices": [{"message": {"content": shadow["teacher_answer"]}, "finish_reason": "stop"}]}
        seen.add(row["id"])
        found.append(_untrusted_reason(row, request, policy) or _example(
            request, response, corrections.get(row["id"]), source="shadow", request_id=row["id"],
            created_at=shadow["created_at"], **options))
    for row in _corrected_student_rows(store, route.name, after, corrections, seen):
        request = _loads(row["request_json"])
        found.append(_untrusted_reason(row, request, policy) or _example(
            request, None, corrections[row["id"]], source="correction", request_id=row["id"],
            created_at=row["created_at"], **options))
    return _newest_per_prompt(found, dropped), dropped


def _newest_per_prompt(found: list[Example | str], dropped: Counter[str]) -> list[Example]:
    """One example per prompt: a corrected one over any other, else the newest; drops counted."""
    newest: dict[str, Example] = {}
    for item in found:
        if isinstance(item, str):
            dropped[item] += 1
            continue
        key = json.dumps(item.messages, sort_keys=True, ensure_ascii=False)
        if key in newest:
            dropped["duplicate"] += 1
            if (newest[key].corrected, newest[key].created_at) > (item.corrected, item.created_at):
                continue
        newest[key] = item
    return sorted(newest.values(), key=lambda example: example.created_at)


def build_dataset(store: Store, route: RouteConfig, *, labels: Collection[str] | None = None,
                  keep_reasoning: bool = False) -> Dataset:
    """The route's curated dataset, split by prompt hash into train and the fixed holdout."""
    examples, dropped = collect_examples(store, route, labels=labels, keep_reasoning=keep_reasoning)
    fraction = route.training.holdout_fraction
    train = [example for example in examples if not in_holdout(example.prompt_text, fraction)]
    holdout = [example for example in examples if in_holdout(example.prompt_text, fraction)]
    dataset = Dataset(route.name, train, holdout, dropped,
                      newest_at=max((example.created_at for example in examples), default=0.0))
    logger.info("dataset built", extra=dataset.summary())
    return dataset


def fresh_examples(store: Store, route: RouteConfig, dataset: Dataset, *, limit: int,
                   labels: Collection[str] | None = None, keep_reasoning: bool = False) -> list[Example]:
    """Up to ``limit`` of the newest fit answers logged after ``dataset`` was built, whose
    prompts it does not hold: a version trained on ``dataset`` never saw them (test, then
    train: the next cycle trains on them)."""
    if limit <= 0:
        return []
    examples, _ = collect_examples(store, route, labels=labels, after=dataset.newest_at, keep_reasoning=keep_reasoning)
    known = {prompt_key(example.prompt_text) for example in (*dataset.train, *dataset.holdout)}
    unseen = [example for example in examples if prompt_key(example.prompt_text) not in known]
    return unseen[-limit:]


def count_new_examples(store: Store, route: str, after: float) -> int:
    """Teacher answers (status 200) and shadow results logged since ``after``; cheap, unfiltered."""
    teacher = sum(1 for _ in store.iter_requests(route, target="teacher", after=after, ok_only=True))
    return teacher + sum(1 for _ in store.iter_shadow_results(route, after=after))
