"""LoRA training, evaluation and the gate on a CLINC150 subset with the tiny local base."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from core.config import Settings, parse_settings
from core.registry import Registry
from core.store import SQLiteStore
from trainer.dataset import Example
from trainer.pipeline import Trainer
from trainer.seed import seed_teacher_answers

ROUTE = "clinc-intents"
INTENTS = 10  # a 10-way subset keeps the run to seconds; chance agreement is ~0.1


def _pairs(clinc_path: Path, per_intent: int) -> list[tuple[str, str]]:
    rows = json.loads(clinc_path.read_text())["train"]
    intents = sorted({intent for _, intent in rows})[:INTENTS]
    pairs = [pair for intent in intents for pair in [(t, i) for t, i in rows if i == intent][:per_intent]]
    random.Random(0).shuffle(pairs)
    return pairs


def _settings(tmp: Path, base: Path, clinc_path: Path, **training: Any) -> Settings:
    return parse_settings({
        "store": {"path": str(tmp / "db.sqlite")}, "vllm": {"model_dir": str(base)},
        "routes": [{"name": ROUTE, "teacher": {"model": "openai/replay-teacher"}, "labels_dataset": str(clinc_path),
                    "student": {"system_prompt": "Intent label:"},
                    "training": {"holdout_fraction": 0.2, "epochs": 15, "learning_rate": 3e-3, **training},
                    "gate": {"minimum": 0.3, "tolerance": 0.02}}],
    })


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, student_base_dir: Path, clinc_path: Path) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("trainer")
    settings = _settings(tmp, student_base_dir, clinc_path)
    store = SQLiteStore(settings.store.path)
    seed_teacher_answers(store, ROUTE, _pairs(clinc_path, per_intent=40))
    trainer = Trainer(settings, store, adapters_root=tmp / "adapters", fit_detector=False, progress=False)
    candidate = trainer.run(ROUTE)
    return {"settings": settings, "store": store, "trainer": trainer, "candidate": candidate, "tmp": tmp}


def test_training_beats_chance_and_passes_the_gate(trained: dict[str, Any]) -> None:
    candidate = trained["candidate"]
    metrics = candidate.metrics["candidate"]
    assert metrics["agreement"] >= 0.3, metrics  # chance is ~0.1 on 10 intents
    assert metrics["validity"] >= 0.8, metrics
    assert candidate.status == "candidate"
    assert candidate.train_examples > 250 and candidate.holdout_examples > 40
    runs = trained["store"].training_runs(ROUTE)
    assert runs[0]["outcome"] == "candidate" and runs[0]["version"] == "v1"


def test_adapter_loads_in_peft_within_vllm_rank(trained: dict[str, Any], student_base_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = Path(trained["candidate"].adapter_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    from core.config import VLLMConfig

    assert config["r"] <= VLLMConfig().max_lora_rank  # the default vLLM launch can load it
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not list(adapter.parent.glob(".adapter.*")), "no temp dir left behind"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(student_base_dir)), str(adapter))
    assert model.peft_config["default"].r == config["r"]


def test_worse_candidate_is_rejected_against_live(trained: dict[str, Any]) -> None:
    registry = Registry(trained["store"])
    registry.set_live(ROUTE, "v1")
    trainer: Trainer = trained["trainer"]
    trainer.train_overrides = {"max_steps": 1}  # a barely trained student
    worse = trainer.run(ROUTE)
    assert worse.version == "v2" and worse.status == "rejected", worse.metrics["gate"]
    assert worse.parent == "v1"
    assert registry.live(ROUTE).version == "v1"


def test_crash_leaves_nothing_promotable(trained: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer.train

    def explode(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(trainer.train, "train_adapter", explode)
    before = {item.version for item in Registry(trained["store"]).list(ROUTE)}
    with pytest.raises(RuntimeError):
        trained["trainer"].run(ROUTE)
    assert {item.version for item in Registry(trained["store"]).list(ROUTE)} == before
    assert trained["store"].training_runs(ROUTE)[0]["outcome"] == "failed"


def test_interrupted_training_resumes_from_checkpoint(tmp_path: Path, student_base_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch, clinc_path: Path) -> None:
    import trainer.train as train_module
    from trainer.train import TrainParams, train_adapter

    examples = [Example([{"role": "user", "content": text}], label, text) for text, label in _pairs(clinc_path, 8)]
    params = TrainParams(max_steps=6, checkpoint_every=3, batch_size=8)
    real_loss, calls = train_module.compute_loss, {"n": 0}

    def flaky_loss(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # the process dies mid-run
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "compute_loss", flaky_loss)
    adapter = tmp_path / "v1" / "adapter"
    with pytest.raises(KeyboardInterrupt):
        train_adapter(student_base_dir, examples, adapter, params, progress=False)
    assert not adapter.exists()
    monkeypatch.setattr(train_module, "compute_loss", real_loss)
    result = train_adapter(student_base_dir, examples, adapter, params, progress=False)
    assert result.resumed_from_step == 3 and (adapter / "adapter_config.json").exists()


def test_logit_distillation_on_aligned_teacher_tokens(tmp_path: Path, student_base_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from trainer.distill import align_teacher_logprobs, distill_loss
    from trainer.train import TrainParams, train_adapter

    tokenizer = AutoTokenizer.from_pretrained(str(student_base_dir))
    answer_ids = tokenizer("book_flight", add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([token_id]) for token_id in answer_ids]
    content = [{"token": piece, "logprob": -0.1,
                "top_logprobs": [{"token": piece, "logprob": -0.1}, {"token": "oos", "logprob": -2.5}]}
               for piece in pieces]
    targets = align_teacher_logprobs(tokenizer, content, answer_ids, offset=4)
    assert targets is not None and targets.positions == list(range(4, 4 + len(answer_ids)))
    assert align_teacher_logprobs(tokenizer, content[:-1], answer_ids, offset=4) is None  # misaligned
    logits = torch.randn(len(answer_ids), len(tokenizer))
    index = torch.full((1, 4 + len(answer_ids)), -1)
    index[0, 4:] = torch.arange(len(answer_ids))
    assert float(distill_loss(logits, index, [targets], temperature=2.0)) > 0
    example = Example([{"role": "user", "content": "fly me to rome"}], "book_flight", "fly me to rome",
                      teacher_logprobs=content)
    result = train_adapter(student_base_dir, [example] * 4, tmp_path / "adapter",
                           TrainParams(max_steps=2, distill_weight=0.5, distill_temperature=2.0), progress=False)
    assert result.distill_examples == 4


def test_gate_minimum_and_tolerance() -> None:
    from core.config import GateConfig
    from trainer.evaluate import EvalResult, gate

    def result(agreement: float) -> EvalResult:
        return EvalResult(agreement=agreement, validity=1.0, examples=100, latency_ms_per_example=1.0, wall_s=0.1)

    config = GateConfig(minimum=0.5, tolerance=0.02)
    assert gate(result(0.8), None, config).passed
    assert not gate(result(0.4), None, config).passed  # below the minimum
    assert gate(result(0.79), result(0.8), config).passed  # within the tolerance
    decision = gate(result(0.7), result(0.8), config)
    assert not decision.passed and "worse than live" in decision.reason


def test_served_agreement_gate_needs_a_served_share() -> None:
    from core.config import GateConfig
    from trainer.evaluate import EvalResult, gate

    def result(share: float, agreement: float) -> EvalResult:
        return EvalResult(agreement=0.5, validity=1.0, examples=100, latency_ms_per_example=1.0, wall_s=0.1,
                          served_share=share, served_agreement=agreement)

    config = GateConfig(metric="served_agreement", minimum=0.9, min_served_share=0.1)
    assert gate(result(0.3, 0.95), None, config).passed
    assert not gate(result(0.3, 0.85), None, config).passed  # what it would serve is not good enough
    assert "served share" in gate(result(0.02, 1.0), None, config).reason  # serves too little to judge
    # Against live: the same agreement on a smaller share is a worse version (tolerance 0.01).
    assert gate(result(0.705, 0.95), result(0.71, 0.95), config).passed
    shrunk = gate(result(0.66, 0.95), result(0.71, 0.95), config)
    assert not shrunk.passed and "below live" in shrunk.reason


def test_evaluation_reports_the_cascade_share(trained: dict[str, Any], student_base_dir: Path) -> None:
    from trainer.dataset import build_dataset
    from trainer.evaluate import evaluate_adapter

    holdout = build_dataset(trained["store"], trained["settings"].routes[0]).holdout
    adapter = trained["candidate"].adapter_path
    everything = evaluate_adapter(student_base_dir, adapter, holdout, confidence_threshold=-1e9)
    nothing = evaluate_adapter(student_base_dir, adapter, holdout, confidence_threshold=0.1)
    assert everything.served_share == 1.0 and everything.served_agreement == pytest.approx(everything.agreement)
    assert nothing.served_share == 0.0


def test_full_finetune_exports_an_exact_lora_adapter(tmp_path: Path, student_base_dir: Path, clinc_path: Path) -> None:
    """Full fine-tuning ships as a LoRA adapter: at full rank, base + adapter is the tuned model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.lora_export import delta_state, export_adapter, freeze_unexportable

    base = AutoModelForCausalLM.from_pretrained(str(student_base_dir))
    base_weights = {name: value.detach().clone() for name, value in base.named_parameters()}
    tuned = AutoModelForCausalLM.from_pretrained(str(student_base_dir))
    trainable = freeze_unexportable(tuned)
    assert not any("norm" in name for name, value in tuned.named_parameters() if value.requires_grad)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in trainable:  # a rank-2 change plus a little full-rank noise, as fine-tuning makes
            rows, columns = parameter.shape
            parameter.add_(torch.randn(rows, 2) @ torch.randn(2, columns) * 0.05)
            parameter.add_(torch.randn_like(parameter) * 1e-3)
    full_rank = max(min(value.shape) for value in delta_state(tuned, base_weights).values())
    inputs = torch.tensor([[5, 17, 42, 99, 7]])
    expected = tuned(input_ids=inputs).logits

    def served(rank: int) -> torch.Tensor:
        out = tmp_path / f"r{rank}"
        export_adapter(student_base_dir, delta_state(tuned, base_weights), out, rank)
        assert json.loads((out / "adapter_config.json").read_text())["r"] == rank
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(student_base_dir)), str(out))
        with torch.no_grad():
            return model.merge_and_unload()(input_ids=inputs).logits

    assert torch.allclose(served(full_rank), expected, atol=1e-4)  # exact at full rank
    truncated_error = (served(4) - expected).abs().max()  # rank 4 keeps the rank-2 part, drops the noise
    assert 1e-4 < truncated_error < (base(input_ids=inputs).logits - expected).abs().max() / 5


def test_warm_start_continues_from_the_live_adapter(tmp_path: Path, student_base_dir: Path, clinc_path: Path) -> None:
    """A warm-started cycle begins where the given adapter ended: its first loss is the adapter's."""
    from trainer.train import TrainParams, train_adapter

    examples = [Example([{"role": "user", "content": text}], label, text) for text, label in _pairs(clinc_path, 6)]
    first = train_adapter(student_base_dir, examples, tmp_path / "v1", TrainParams(max_steps=40, batch_size=16,
                          learning_rate=3e-3), progress=False)
    cold = train_adapter(student_base_dir, examples, tmp_path / "cold", TrainParams(max_steps=1, batch_size=60),
                         progress=False)
    warm = train_adapter(student_base_dir, examples, tmp_path / "warm",
                         TrainParams(max_steps=1, batch_size=60, init_adapter=str(tmp_path / "v1")), progress=False)
    assert warm.final_loss < cold.final_loss / 2, (first.final_loss, warm.final_loss, cold.final_loss)


def test_full_finetune_trains_the_head_tied_to_the_embeddings(tmp_path: Path, student_base_dir: Path,
                                                              clinc_path: Path) -> None:
    """The local base's head starts equal to its embeddings; training moves them as one table,
    and the served model (base + exported adapter, here at full rank) keeps them equal, also
    after a warm start from such an adapter."""
    import torch

    from trainer.evaluate import load_for_inference
    from trainer.train import TrainParams, train_adapter

    examples = [Example([{"role": "user", "content": text}], label, text) for text, label in _pairs(clinc_path, 2)]
    params = TrainParams(max_steps=6, batch_size=16, learning_rate=3e-3, lora_rank=384)
    train_adapter(student_base_dir, examples, tmp_path / "v1", params, progress=False)
    train_adapter(student_base_dir, examples, tmp_path / "v2",
                  params.model_copy(update={"init_adapter": str(tmp_path / "v1")}), progress=False)
    base, _ = load_for_inference(student_base_dir, None)
    for version in ("v1", "v2"):
        served, _ = load_for_inference(student_base_dir, tmp_path / version)
        head, embeddings = served.lm_head.weight, served.model.embed_tokens.weight
        assert torch.allclose(head, embeddings, atol=1e-4), version
        assert (embeddings - base.model.embed_tokens.weight).abs().max() > 1e-3, version  # it did train


def test_cycle_warm_starts_from_live_on_new_answers_plus_replay(trained: dict[str, Any], clinc_path: Path) -> None:
    import time as time_module

    registry = Registry(trained["store"])
    registry.set_live(ROUTE, "v1")
    rows = json.loads(clinc_path.read_text())["train"]
    intents = sorted({intent for _, intent in rows})[:INTENTS]
    # Six unseen prompts per intent (the fixture seeded each intent's first 40).
    fresh = [pair for intent in intents for pair in [(t, i) for t, i in rows if i == intent][40:46]]
    seed_teacher_answers(trained["store"], ROUTE, fresh, start_at=time_module.time() + 10)
    trainer = Trainer(trained["settings"], trained["store"], adapters_root=trained["tmp"] / "adapters",
                      fit_detector=False, progress=False, train_overrides={"max_steps": 2})
    warm = trainer.run(ROUTE)
    train = warm.metrics["train"]
    new = warm.train_examples - trained["candidate"].train_examples
    assert train["warm_start_from"] == "v1" and 40 < new <= 60
    assert train["examples"] == 2 * new  # the new answers and as many replayed old ones
    cold_settings = trained["settings"].model_copy(deep=True)
    cold_settings.routes[0].training.warm_start = False
    cold = Trainer(cold_settings, trained["store"], adapters_root=trained["tmp"] / "adapters", fit_detector=False,
                   progress=False, train_overrides={"max_steps": 2}).run(ROUTE)
    assert cold.metrics["train"]["warm_start_from"] is None and cold.metrics["train"]["examples"] == cold.train_examples


def test_warm_cycles_give_new_answers_their_share_of_a_cold_runs_passes() -> None:
    from core.config import TrainingConfig
    from trainer.pipeline import warm_epochs

    training = TrainingConfig(epochs=10, warm_start_epochs=4)
    assert warm_epochs(training, new=300, total=900) == 4  # a third new: the warm default
    assert warm_epochs(training, new=940, total=1355) == pytest.approx(10 * 940 / 1355)  # mostly new: more
    assert warm_epochs(training, new=1000, total=1000) == 10  # never more than a cold run
