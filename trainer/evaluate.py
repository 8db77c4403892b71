"""Evaluating a student version on the route's holdout, and the promotion gate.

In-process, with transformers and peft: batched greedy decoding of the exact serving prompt
(the chat template with the generation prompt, as vLLM renders it). Metrics: agreement
with the teacher (exact match after normalization), validity (label routes: a known label;
JSON requests: parses; otherwise non-empty) and latency (batched, per example).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.answers import answers_agree, normalize_answer, strip_reasoning
from core.config import CascadeConfig, GateConfig
from trainer.dataset import Example

logger = logging.getLogger(__name__)

PER_EXAMPLE = ("agrees", "cascade_scores")


@dataclass
class EvalResult:
    agreement: float
    validity: float
    examples: int
    latency_ms_per_example: float
    wall_s: float
    # With a cascade (route confidence_threshold), the student serves only the answers it is
    # confident of: their share, and their agreement with the teacher — what clients get.
    served_share: float | None = None
    served_agreement: float | None = None
    # The threshold the cascade serves this version at: the route's fixed one, or (with
    # cascade.target_agreement) this version's own, calibrated on the holdout.
    confidence_threshold: float | None = None
    # Per example, in holdout order; kept out of ``to_dict`` (the registry's metrics): whether
    # the answer agreed with the teacher (the learned router trains on it) and its cascade score.
    agrees: list[bool] = field(default_factory=list, repr=False)
    cascade_scores: list[float] = field(default_factory=list, repr=False)

    def metric(self, name: str) -> float:
        value = getattr(self, name)
        return float(value) if value is not None else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if key not in PER_EXAMPLE}


@dataclass
class GateDecision:
    passed: bool
    reason: str
    metric: str
    candidate: float
    live: float | None


def is_valid(answer: str, labels: Collection[str] | None, json_request: bool) -> bool:
    text = strip_reasoning(answer)
    if labels is not None:
        return normalize_answer(text) in labels
    if json_request:
        try:
            json.loads(text)
        except ValueError:
            return False
        return True
    return bool(text)


def score_answers(examples: Sequence[Example], answers: Sequence[str], labels: Collection[str] | None,
                  wall_s: float) -> EvalResult:
    """Agreement and validity of ``answers`` against the teacher's answers in ``examples``."""
    label_set = {normalize_answer(label) for label in labels} if labels is not None else None
    agrees = [answers_agree(answer, example.answer) for example, answer in zip(examples, answers, strict=True)]
    valid = sum(is_valid(answer, label_set, example.json_request)
                for example, answer in zip(examples, answers, strict=True))
    count = max(1, len(examples))
    return EvalResult(agreement=sum(agrees) / count, validity=valid / count, examples=len(examples),
                      latency_ms_per_example=wall_s * 1000 / count, wall_s=wall_s, agrees=agrees)


def load_for_inference(base_dir: str | Path, adapter_dir: str | Path | None) -> tuple[Any, Any]:
    """The base model with ``adapter_dir`` applied (None: the bare base), and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)  # see TrainParams.threads: one thread is faster on these machines
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
        model = model.merge_and_unload()  # same outputs, no LoRA overhead per forward
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    model.eval()
    return model, tokenizer


def generate(model: Any, tokenizer: Any, prompts: Sequence[list[dict[str, Any]]], *, max_new_tokens: int,
             batch_size: int = 64) -> tuple[list[str], list[float]]:
    """Greedy answers for chat prompts, batched (left padding), with each answer's mean token
    logprob (up to and including EOS, as vLLM reports it for the cascade)."""
    import torch

    from trainer.train import render_prompt

    answers: list[str] = []
    mean_logprobs: list[float] = []
    for start in range(0, len(prompts), batch_size):
        texts = [render_prompt(tokenizer, messages) for messages in prompts[start:start + batch_size]]
        batch = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True).to(model.device)
        with torch.inference_mode():
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                    output_scores=True, return_dict_in_generate=True)
        new_tokens = output.sequences[:, batch["input_ids"].shape[1]:]
        logprobs = torch.stack([torch.log_softmax(step.float(), dim=-1) for step in output.scores], dim=1)
        chosen = logprobs.gather(2, new_tokens.unsqueeze(-1)).squeeze(-1)
        answers.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        mean_logprobs.extend(_answer_mean(row_ids, row_logprobs, tokenizer.eos_token_id)
                             for row_ids, row_logprobs in zip(new_tokens.tolist(), chosen.tolist(), strict=True))
    return [answer.strip() for answer in answers], mean_logprobs


def _answer_mean(token_ids: list[int], logprobs: list[float], eos_id: int) -> float:
    length = token_ids.index(eos_id) + 1 if eos_id in token_ids else len(token_ids)
    return sum(logprobs[:length]) / max(1, length)


def answer_budget(tokenizer: Any, examples: Sequence[Example], cap: int = 128) -> int:
    """Enough new tokens for the longest teacher answer (plus EOS), capped."""
    longest = max((len(tokenizer(example.answer, add_special_tokens=False)["input_ids"]) for example in examples),
                  default=1)
    return min(cap, longest + 2)


def evaluate_adapter(base_dir: str | Path, adapter_dir: str | Path | None, holdout: Sequence[Example], *,
                     labels: Collection[str] | None = None, batch_size: int = 64,
                     confidence_threshold: float | None = None, cascade: CascadeConfig | None = None,
                     neighbours: Sequence[Sequence[int]] | None = None, seed: str = "") -> EvalResult:
    """Evaluate one student version (``adapter_dir`` None: the bare base) on ``holdout``.

    With a cascade (a fixed ``confidence_threshold``, or ``cascade.target_agreement`` for a
    threshold of the version's own), also the share and agreement of the answers it would
    serve. ``neighbours``: the teacher's answer hashes for each holdout prompt's nearest
    training prompts, from the version's detector, as the router would find them."""
    model, tokenizer = load_for_inference(base_dir, adapter_dir)
    started = time.perf_counter()
    answers, mean_logprobs = generate(model, tokenizer, [example.messages for example in holdout],
                                      max_new_tokens=answer_budget(tokenizer, holdout), batch_size=batch_size)
    result = score_answers(holdout, answers, labels, time.perf_counter() - started)
    if holdout and (confidence_threshold is not None or (cascade and cascade.target_agreement is not None)):
        _add_served(result, holdout, answers, mean_logprobs, labels, confidence_threshold,
                    cascade or CascadeConfig(), neighbours, seed)
    logger.info("student evaluated", extra={"adapter": str(adapter_dir), **result.to_dict()})
    return result


def _add_served(result: EvalResult, holdout: Sequence[Example], answers: Sequence[str],
                mean_logprobs: Sequence[float], labels: Collection[str] | None, fixed_threshold: float | None,
                cascade: CascadeConfig, neighbours: Sequence[Sequence[int]] | None, seed: str) -> None:
    """The served share and agreement at the fixed threshold, or cross-fitted at a calibrated one."""
    from router.uncertainty import penalised
    from trainer.cascade import cross_fitted

    # An answer the route escalates is never served: no threshold may reach it.
    scores = [-math.inf if cascade.escalates(answer) else
              penalised(mean_logprob, answer, neighbours[index] if neighbours else (), cascade.disagreement_penalty)
              for index, (answer, mean_logprob) in enumerate(zip(answers, mean_logprobs, strict=True))]
    result.cascade_scores = scores
    if cascade.target_agreement is not None:
        calibration = cross_fitted(scores, result.agrees, cascade.target_agreement, seed,
                                   cascade.calibration_confidence)
        served, result.confidence_threshold = calibration.served, calibration.threshold
    else:
        assert fixed_threshold is not None
        served = [index for index, score in enumerate(scores) if score >= fixed_threshold]
        result.confidence_threshold = fixed_threshold
    result.served_share = len(served) / len(holdout)
    result.served_agreement = score_answers([holdout[index] for index in served],
                                            [answers[index] for index in served], labels, 0.0).agreement \
        if served else 0.0


def gate(candidate: EvalResult, live: EvalResult | None, config: GateConfig) -> GateDecision:
    """Promote only if the metric meets the minimum and is not worse than live beyond the
    tolerance (on ``served_agreement``: nor the served share)."""
    value = candidate.metric(config.metric)
    live_value = live.metric(config.metric) if live is not None else None
    if candidate.examples == 0:
        return GateDecision(False, "empty holdout", config.metric, value, live_value)
    if config.metric == "served_agreement" and (candidate.served_share or 0.0) < config.min_served_share:
        return GateDecision(False, f"served share {candidate.served_share or 0.0:.3f} < minimum "
                                   f"{config.min_served_share:.3f}", config.metric, value, live_value)
    if value < config.minimum:
        return GateDecision(False, f"{config.metric} {value:.3f} < minimum {config.minimum:.3f}",
                            config.metric, value, live_value)
    if live_value is not None and value < live_value - config.tolerance:
        return GateDecision(False, f"{config.metric} {value:.3f} worse than live {live_value:.3f} "
                                   f"beyond tolerance {config.tolerance:.3f}", config.metric, value, live_value)
    # A calibrated cascade holds every version's served agreement near its target, so what
    # a worse version loses is its share. (Measured: a warm-started chain in the full demo
    # slid from 0.71 to 0.44 served share at 0.95 agreement, each step passing on agreement.)
    live_share = live.served_share if live is not None and config.metric == "served_agreement" else None
    if live_share is not None and (candidate.served_share or 0.0) < live_share - config.tolerance:
        return GateDecision(False, f"served share {candidate.served_share or 0.0:.3f} below live {live_share:.3f} "
                                   f"beyond tolerance {config.tolerance:.3f}", config.metric, value, live_value)
    return GateDecision(True, "passed", config.metric, value, live_value)
