"""A fully fine-tuned student, shipped as a LoRA adapter of its base.

The hot swap loads one LoRA adapter per version into vLLM on top of a fixed base model, but
full fine-tuning learns much more than LoRA on the tiny local base (bench/train.py). So we
fine-tune every weight matrix and then factor each weight's change, ``tuned - base``, by a
truncated SVD into LoRA's ``B @ A`` (``lora_alpha == r``, so peft's scale is 1). When the
rank is at least the matrix's rank the adapter is exact; on CLINC150 the deltas are close
to low-rank and truncating them to 128 cost little (see ``TrainParams.lora_rank``).

Only 2-D weights can be factored: normalisation weights stay frozen during full
fine-tuning (``freeze_unexportable``) so the adapter reproduces the tuned model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Every module vLLM's LoRA serves on a Llama: attention, MLP, the embeddings and the LM head.
EXPORTABLE_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                      "lm_head", "embed_tokens")


def freeze_unexportable(model: Any) -> list[torch.nn.Parameter]:
    """Freeze every parameter a LoRA adapter cannot carry; returns the trainable ones."""
    trainable = []
    for name, parameter in model.named_parameters():
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
        keep = module in EXPORTABLE_MODULES and name.endswith(".weight") and parameter.dim() == 2
        parameter.requires_grad_(keep)
        if keep:
            trainable.append(parameter)
    return trainable


def factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``B (out, r)`` and ``A (r, in)`` with ``B @ A`` the best rank-``r`` approximation of ``delta``.

    The singular values are split evenly (√S on each side) so neither factor is tiny.
    """
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    b = (u[:, :rank] * root).to(delta.dtype)
    a = (root[:, None] * vh[:rank]).to(delta.dtype)
    return b.contiguous(), a.contiguous()


def delta_state(tuned: Any, base_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tuned - base`` for each exportable 2-D weight that changed."""
    deltas = {}
    # Every name of a shared table (a head trained tied to the embeddings): each module of
    # the untied served model gets the change.
    for name, parameter in tuned.named_parameters(remove_duplicate=False):
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
        if module in EXPORTABLE_MODULES and parameter.dim() == 2 and name in base_weights:
            delta = parameter.detach().float().cpu() - base_weights[name].float()
            if torch.any(delta != 0):
                deltas[name] = delta
    return deltas


def export_adapter(base_dir: str | Path, deltas: dict[str, torch.Tensor], out_dir: str | Path, rank: int) -> Any:
    """Write ``deltas`` (weight name → change) as a peft LoRA adapter of ``base_dir``; returns the peft model.

    The adapter is a standard peft directory (adapter_config.json + safetensors), loadable by
    peft and by vLLM's ``load_lora_adapter``.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    modules = sorted({name.rsplit(".", 2)[-2] for name in deltas})
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=modules, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, module in model.named_modules():
            key = name.removeprefix("base_model.model.") + ".weight"
            if key not in deltas:
                continue
            if "default" in getattr(module, "lora_embedding_A", {}):
                # peft's embedding LoRA: weight delta = (B @ A).T with A (r, vocab), B (hidden, r).
                b, a = factor(deltas[key].T, rank)
                _assign(module.lora_embedding_A["default"], a)
                _assign(module.lora_embedding_B["default"], b)
            elif "default" in getattr(module, "lora_A", {}):
                b, a = factor(deltas[key], rank)
                _assign(module.lora_A["default"].weight, a)
                _assign(module.lora_B["default"].weight, b)
    model.save_pretrained(str(out_dir), save_embedding_layers=False)
    return model


def _assign(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a (possibly lower-rank) factor into peft's rank-``r`` slot, zero-padding the rest."""
    target.zero_()
    if target.shape[0] == value.shape[0] and target.shape[1] != value.shape[1]:
        target[:, : value.shape[1]] = value  # B: (out, r)
    elif target.shape[1] == value.shape[1] and target.shape[0] != value.shape[0]:
        target[: value.shape[0]] = value  # A: (r, in)
    else:
        target.copy_(value)
