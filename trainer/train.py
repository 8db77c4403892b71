"""Supervised fine-tuning of a route's student on the teacher's answers, shipped as a LoRA adapter.

Two methods (``TrainParams.method``): ``full`` fine-tunes every weight matrix and exports
the change as a LoRA adapter by truncated SVD (``trainer.lora_export``); ``lora`` trains a
LoRA adapter directly. Both write the same kind of adapter, which the hot swap loads into
vLLM. A cycle may warm-start from the live version's adapter (``init_adapter``).

The prompt is the tokenizer's chat template with ``add_generation_prompt`` (exactly what
vLLM renders at serving); the loss covers the answer tokens and EOS only. Optional logit
distillation adds a temperature-scaled KL term on the teacher's top-k token distribution
(see ``trainer.distill``). The output directory is resumable: a checkpoint is written every
``checkpoint_every`` steps and a rerun with the same data and parameters resumes from it.
The adapter is written with ``save_pretrained`` into a temporary directory and renamed into
place, so a reader never sees a half-written adapter.

torch, transformers and peft are imported here only; the gateway never imports this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from core.config import RouteConfig
from trainer.dataset import Example
from trainer.distill import DistillTargets, align_teacher_logprobs, distill_loss

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
CHECKPOINT_FILE = "checkpoint.pt"
# Every linear layer plus the embeddings and the LM head: vLLM (0.32, CPU) serves LoRA on
# all of them (lm_head through LogitsProcessorWithLoRA), greedy answers matching peft's on
# 95% of prompts (vLLM runs bf16). On the tiny local base, LoRA on the attention and MLP
# only cannot move a frozen random LM head far enough: CLINC150 loss plateaued at 3.7 with
# 0% held-out agreement; with lm_head and embed_tokens it reached 1.2 in the same steps.
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens"]


class TrainParams(BaseModel):
    """Hyper-parameters of one LoRA run; ``from_route`` takes the route's training section."""

    model_config = ConfigDict(extra="forbid")

    # Full fine-tuning (exported as a LoRA adapter) beat LoRA on the tiny local base; see
    # bench/train.py and trainer/lora_export.py.
    method: Literal["full", "lora"] = "full"
    epochs: float = Field(3.0, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    # The adapter's rank: LoRA's rank, or the SVD rank a full fine-tune is exported at.
    # vLLM must run with ``--max-lora-rank`` at least this (one of 8..512).
    lora_rank: int = Field(128, ge=1, le=512)
    lora_alpha: float | None = None  # default: 2 * rank
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = DEFAULT_TARGET_MODULES
    batch_size: int = Field(16, ge=1)
    max_steps: int | None = Field(None, ge=1)
    max_length: int = Field(256, ge=8)
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    distill_weight: float = Field(0.0, ge=0)
    distill_temperature: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(200, ge=1)
    # One thread: on the shared 2-core machines OpenMP threads of a model this small spin
    # against each other (measured: 110 ms a step with 1 thread, 186 ms with 2).
    threads: int = Field(1, ge=1)
    device: str | None = None  # None: CUDA when available (a real base model), else CPU
    # Warm start: the live version's adapter, applied to the base before training.
    init_adapter: str | None = None

    @classmethod
    def from_route(cls, route: RouteConfig, **overrides: Any) -> TrainParams:
        """The route's ``training`` settings for every field both define, then ``overrides``.

        Fields the route config does not (yet) have, e.g. ``distill_weight``, keep defaults.
        """
        training = route.training.model_dump()
        values = {key: value for key, value in training.items() if key in cls.model_fields}
        values.update(overrides)
        return cls(**values)

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    distill: DistillTargets | None = None


@dataclass
class TrainResult:
    adapter_dir: str
    steps: int
    epochs: float
    examples: int
    examples_seen: int
    skipped_too_long: int
    distill_examples: int
    resumed_from_step: int
    final_loss: float
    wall_s: float
    examples_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- encoding ---------------------------------------------------------------------------------
def render_prompt(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    """The prompt text vLLM renders for a chat request (chat template + generation prompt)."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    # The template writes its special tokens as text; vLLM tokenizes chat prompts the same way.
    return tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]


def encode_example(tokenizer: Any, example: Example, max_length: int, *, with_distill: bool) -> Encoded | None:
    """Token ids with labels on the answer and EOS only; None when longer than ``max_length``."""
    prompt = prompt_ids(tokenizer, example.messages)
    answer = tokenizer(example.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt) + len(answer) > max_length:
        return None
    distill = None
    if with_distill and example.teacher_logprobs:
        distill = align_teacher_logprobs(tokenizer, example.teacher_logprobs, answer[:-1], offset=len(prompt) - 1)
    return Encoded(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, distill)


def encode_all(tokenizer: Any, examples: Sequence[Example], params: TrainParams) -> tuple[list[Encoded], int]:
    encoded, skipped = [], 0
    for example in examples:
        item = encode_example(tokenizer, example, params.max_length, with_distill=params.distill_weight > 0)
        if item is None:
            skipped += 1
        else:
            encoded.append(item)
    return encoded, skipped


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(item.input_ids) for item in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        size = len(item.input_ids)
        input_ids[row, :size] = torch.tensor(item.input_ids)
        labels[row, :size] = torch.tensor(item.labels)
        attention[row, :size] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def epoch_batches(items: list[Encoded], batch_size: int, seed: int, epoch: int) -> list[list[Encoded]]:
    """This epoch's batches: a seeded shuffle (reproducible, so a resumed run skips exactly)."""
    order = list(range(len(items)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return [[items[i] for i in order[start:start + batch_size]] for start in range(0, len(order), batch_size)]


# -- model ------------------------------------------------------------------------------------
def load_student(base_dir: Path, params: TrainParams) -> tuple[Any, Any, dict[str, torch.Tensor] | None]:
    """The model to train, its tokenizer, and (full fine-tuning) the base's weights to diff against.

    With ``params.init_adapter`` (warm start) training starts from that adapter; a full
    fine-tune's delta is still taken against the pristine base, so the exported adapter
    is a complete version, not a patch on the previous one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if params.method == "full":
        from trainer.lora_export import freeze_unexportable

        base_weights = {name: value.detach().clone() for name, value in model.named_parameters()}
        if params.init_adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, params.init_adapter).merge_and_unload()
        tie_head_to_embeddings(model)
        freeze_unexportable(model)
        return model, tokenizer, base_weights
    return _lora_model(model, params), tokenizer, None


def tie_head_to_embeddings(model: Any) -> bool:
    """Share one table between the LM head and the input embeddings for full fine-tuning,
    when they start equal (the locally built base; a warm start whose adapter kept them so).

    The saved config stays untied: the export writes the table's change to both modules.
    A head that differs (a real model's, or an older local base's random one) is left alone.
    """
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is embeddings.weight or head.weight.shape != embeddings.weight.shape:
        return False
    if not torch.allclose(head.weight, embeddings.weight, atol=1e-5):
        return False
    head.weight = embeddings.weight
    return True


def _lora_model(model: Any, params: TrainParams) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    if params.init_adapter:
        return PeftModel.from_pretrained(model, params.init_adapter, is_trainable=True)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [module for module in params.target_modules if module in present]
    config = LoraConfig(r=params.lora_rank, lora_alpha=params.alpha, lora_dropout=params.lora_dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def compute_loss(model: Any, batch: dict[str, torch.Tensor], distill: list[DistillTargets | None],
                 params: TrainParams) -> torch.Tensor:
    """Cross-entropy on answer tokens (+ the distillation term).

    The vocabulary projection runs only on the answer positions: prompts are most of every
    sequence, and on a tiny model the projection is a large share of the compute.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    selected = targets != IGNORE_INDEX
    logits = causal_lm.lm_head(hidden[:, :-1][selected])
    loss = torch.nn.functional.cross_entropy(logits, targets[selected])
    if params.distill_weight > 0 and any(item is not None for item in distill):
        # Row of ``logits`` for each (batch row, position); -1 where no answer token is.
        index = torch.full(selected.shape, -1, dtype=torch.long, device=logits.device)
        index[selected] = torch.arange(int(selected.sum()), device=logits.device)
        loss = loss + params.distill_weight * distill_loss(logits, index, distill, params.distill_temperature)
    return loss


# -- checkpoints ------------------------------------------------------------------------------
def run_fingerprint(base_dir: Path, examples: Sequence[Example], params: TrainParams) -> str:
    """Identifies a run: a checkpoint resumes only the same data, base and parameters."""
    digest = hashlib.sha256(str(Path(base_dir).resolve()).encode())
    digest.update(params.model_dump_json().encode())
    for example in examples:
        digest.update(json.dumps([example.messages, example.answer], sort_keys=True).encode())
    return digest.hexdigest()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    state = torch.load(path, weights_only=False)
    if state.get("fingerprint") != fingerprint:
        logger.info("checkpoint is from another run; starting fresh", extra={"checkpoint": str(path)})
        return None
    return state


def save_adapter_atomically(model: Any, adapter_dir: Path, metadata: dict[str, Any], *, base_dir: Path,
                            base_weights: dict[str, torch.Tensor] | None, rank: int) -> None:
    """Write the adapter into a sibling temp dir, then one rename: never a half-written adapter.

    A LoRA model saves its own weights; a fully fine-tuned one (``base_weights`` given) is
    exported as a rank-``rank`` LoRA adapter of ``base_dir``.
    """
    adapter_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{adapter_dir.name}.", dir=adapter_dir.parent))
    try:
        if base_weights is None:
            # The LoRA weights only: the full embedding and LM head stay in the base model.
            model.save_pretrained(str(temporary), save_embedding_layers=False)
        else:
            from trainer.lora_export import delta_state, export_adapter

            export_adapter(base_dir, delta_state(model, base_weights), temporary, rank)
        (temporary / "distillgate.json").write_text(json.dumps(metadata, indent=2, default=str))
        os.rename(temporary, adapter_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


# -- the loop ---------------------------------------------------------------------------------
def _schedule(total_steps: int, warmup_fraction: float):
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))  # cosine to zero

    return factor


def _batches_from(items: list[Encoded], params: TrainParams, start_step: int, total_steps: int
                  ) -> Iterator[tuple[int, list[Encoded]]]:
    """(global step, batch) from ``start_step`` to ``total_steps``, epoch after epoch."""
    per_epoch = math.ceil(len(items) / params.batch_size)
    step = start_step
    while step < total_steps:
        epoch, skip = divmod(step, per_epoch)
        for batch in epoch_batches(items, params.batch_size, params.seed, epoch)[skip:]:
            if step >= total_steps:
                return
            yield step, batch
            step += 1


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]training[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(), disable=not enabled)


def train_adapter(base_dir: str | Path, examples: Sequence[Example], adapter_dir: str | Path,
                  params: TrainParams, *, work_dir: str | Path | None = None, progress: bool = True,
                  metadata: dict[str, Any] | None = None) -> TrainResult:
    """Train a LoRA adapter on ``examples`` and write it to ``adapter_dir`` (which must not exist).

    ``work_dir`` (default: ``<adapter_dir>.work``) holds the resumable checkpoint; it is
    removed once the adapter is in place.
    """
    started = time.perf_counter()
    base_dir, adapter_dir = Path(base_dir), Path(adapter_dir)
    if adapter_dir.exists():
        raise FileExistsError(f"adapter directory already exists: {adapter_dir}")
    work = Path(work_dir) if work_dir else adapter_dir.with_name(adapter_dir.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(params.seed)
    torch.set_num_threads(params.threads)
    device = params.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, base_weights = load_student(base_dir, params)
    model.to(device)
    items, skipped = encode_all(tokenizer, examples, params)
    if not items:
        raise ValueError("no training example fits max_length")
    per_epoch = math.ceil(len(items) / params.batch_size)
    total_steps = params.max_steps or max(1, math.ceil(per_epoch * params.epochs))
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=params.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total_steps, params.warmup_fraction))
    fingerprint = run_fingerprint(base_dir, examples, params)
    start_step, loss_value = _resume(work / CHECKPOINT_FILE, fingerprint, model, optimizer, scheduler)
    model.train()
    with _progress(progress) as bar:
        task = bar.add_task(adapter_dir.name, total=total_steps, completed=start_step, loss=float("nan"))
        for step, batch in _batches_from(items, params, start_step, total_steps):
            tensors = {key: value.to(device) for key, value in collate(batch, tokenizer.pad_token_id).items()}
            loss = compute_loss(model, tensors, [item.distill for item in batch], params)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = 0.9 * loss_value + 0.1 * loss.item() if step > start_step else loss.item()
            bar.update(task, advance=1, loss=loss_value)
            if (step + 1) % params.checkpoint_every == 0 and step + 1 < total_steps:
                _checkpoint(work / CHECKPOINT_FILE, fingerprint, step + 1, loss_value, model, optimizer, scheduler)
    wall = time.perf_counter() - started
    result = TrainResult(
        adapter_dir=str(adapter_dir), steps=total_steps, epochs=total_steps / per_epoch, examples=len(items),
        examples_seen=(total_steps - start_step) * params.batch_size, skipped_too_long=skipped,
        distill_examples=sum(1 for item in items if item.distill is not None), resumed_from_step=start_step,
        final_loss=loss_value, wall_s=wall, examples_per_s=(total_steps - start_step) * params.batch_size / wall,
    )
    save_adapter_atomically(model, adapter_dir, {**(metadata or {}), "params": params.model_dump(),
                                                 "result": result.to_dict(), "base_dir": str(base_dir)},
                            base_dir=base_dir, base_weights=base_weights, rank=params.lora_rank)
    shutil.rmtree(work, ignore_errors=True)
    logger.info("adapter trained", extra=result.to_dict())
    return result


def _trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """What a checkpoint must keep: the trained parameters (LoRA weights or the tuned matrices)."""
    return {name: value.detach().cpu().clone() for name, value in model.named_parameters() if value.requires_grad}


def _checkpoint(path: Path, fingerprint: str, step: int, loss: float, model: Any, optimizer: Any,
                scheduler: Any) -> None:
    save_checkpoint(path, {"fingerprint": fingerprint, "step": step, "loss": loss, "trained": _trainable_state(model),
                           "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})


def _resume(path: Path, fingerprint: str, model: Any, optimizer: Any, scheduler: Any) -> tuple[int, float]:
    state = load_checkpoint(path, fingerprint)
    if state is None:
        return 0, float("nan")
    model.load_state_dict(state["trained"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    logger.info("resuming from checkpoint", extra={"checkpoint": str(path), "step": state["step"]})
    return int(state["step"]), float(state["loss"])
