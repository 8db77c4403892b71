"""Logit distillation from the teacher's ``top_logprobs`` (sparse, top-k knowledge distillation).

Usable only when the teacher shares the student's tokenizer: every teacher token must be
exactly one student token, and the teacher's chosen tokens must be the student's
tokenization of the answer. Examples that do not align train on the answer text alone.

The term is KL(p_teacher || q_student) at temperature T on the teacher's top-k tokens:
the teacher's top-k log-probabilities renormalized over k, against the student's
full-vocabulary log-softmax gathered at those k ids, scaled by T² (Hinton et al.) so its
gradient does not shrink as T grows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class DistillTargets:
    positions: list[int]  # sequence positions whose logits predict each answer token
    ids: list[list[int]]  # per position: the teacher's top-k token ids (student vocabulary)
    logprobs: list[list[float]]  # per position: the teacher's log-probabilities of those ids


def single_token_id(tokenizer: Any, token: str) -> int | None:
    """The student id of a teacher token string, if it is exactly one student token."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def _top_k(tokenizer: Any, entry: dict[str, Any]) -> tuple[list[int], list[float]]:
    ids, logprobs = [], []
    for alternative in entry.get("top_logprobs") or [entry]:
        token_id = single_token_id(tokenizer, str(alternative.get("token", "")))
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
            logprobs.append(float(alternative.get("logprob", float("-inf"))))
    return ids, logprobs


def align_teacher_logprobs(tokenizer: Any, content: list[dict[str, Any]], answer_ids: list[int],
                           offset: int) -> DistillTargets | None:
    """Per-answer-token top-k targets, or None when the teacher's tokens are not the student's."""
    if len(content) != len(answer_ids):
        return None
    targets = DistillTargets([], [], [])
    for index, (entry, answer_id) in enumerate(zip(content, answer_ids, strict=True)):
        if single_token_id(tokenizer, str(entry.get("token", ""))) != answer_id:
            return None
        ids, logprobs = _top_k(tokenizer, entry)
        if answer_id not in ids:
            return None
        targets.positions.append(offset + index)
        targets.ids.append(ids)
        targets.logprobs.append(logprobs)
    return targets


def distill_loss(logits: torch.Tensor, index: torch.Tensor, targets: list[DistillTargets | None],
                 temperature: float) -> torch.Tensor:
    """Mean over aligned answer positions of T² · KL(teacher top-k ‖ student).

    ``logits``: [N, V] for the answer positions; ``index[row, position]`` is the row of
    ``logits`` for that sequence position (-1: none).
    """
    rows, positions, ids, logprobs = [], [], [], []
    for row, target in enumerate(targets):
        if target is None:
            continue
        for position, top_ids, top_logprobs in zip(target.positions, target.ids, target.logprobs, strict=True):
            rows.append(row)
            positions.append(position)
            ids.append(top_ids)
            logprobs.append(top_logprobs)
    if not rows:
        return logits.new_zeros(())
    width = max(len(item) for item in ids)
    id_tensor = torch.zeros((len(ids), width), dtype=torch.long, device=logits.device)
    teacher = torch.full((len(ids), width), float("-inf"), device=logits.device)
    for slot, (top_ids, top_logprobs) in enumerate(zip(ids, logprobs, strict=True)):
        id_tensor[slot, : len(top_ids)] = torch.tensor(top_ids, device=logits.device)
        teacher[slot, : len(top_logprobs)] = torch.tensor(top_logprobs, device=logits.device)
    teacher_p = torch.softmax(teacher / temperature, dim=-1)
    student = torch.log_softmax(logits[index[rows, positions]] / temperature, dim=-1).gather(1, id_tensor)
    present = teacher_p > 0
    kl = torch.where(present, teacher_p * (torch.log(teacher_p.clamp_min(1e-12)) - student), 0.0).sum(-1)
    return kl.mean() * temperature**2
