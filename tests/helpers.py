"""Shared test helpers: real servers on loopback (an ASGI app under uvicorn in a thread), the
official SDK client, the request log as the writer leaves it, and the data files.

Test modules import from here, never from each other."""

from __future__ import annotations

import json
import socket
import sqlite3
import struct
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import uvicorn

from core.config import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class UvicornThread:
    """Runs ``app`` under a real uvicorn server (lifespan included) until ``stop()``."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> UvicornThread:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        if self._thread.is_alive():  # a lifespan still draining on a loaded machine: cut it short
            self.server.force_exit = True
            self._thread.join(timeout=30)

    def __enter__(self) -> UvicornThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


ROOT = Path(__file__).resolve().parents[1]
CLINC = ROOT / "data" / "clinc150" / "data_full.json"
UTTERANCE = "transfer $20000 from my savings account to checking account"  # CLINC150 train: transfer
MESSAGES = [{"role": "system", "content": "You label customer utterances."}, {"role": "user", "content": UTTERANCE}]


def sdk(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=30)


def log_rows(settings: Settings, expected: int, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """The request log once the batched writer has caught up with ``expected`` rows."""
    deadline = time.monotonic() + timeout_s
    while True:
        with sqlite3.connect(settings.store.path) as connection:
            connection.row_factory = sqlite3.Row
            rows = [dict(row) for row in connection.execute("select * from requests order by created_at")]
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def row(index: int) -> dict[str, Any]:
    return {"id": f"r{index}", "created_at": float(index), "route": "r", "target": "teacher", "status_code": 200}


def tool_calling_student(request: httpx.Request) -> httpx.Response:
    """A student that learned to call: it answers with the call written as JSON text."""
    body = json.loads(request.content)
    assert "tools" not in body and body["stream"] is False  # tools are in its prompt; whole answers only
    assert body["messages"][0]["role"] == "system" and '"name":"transfer"' in body["messages"][0]["content"]
    return httpx.Response(200, json={
        "id": "x", "object": "chat.completion", "created": 1, "model": body["model"],
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": '{"name": "transfer", "arguments": {"amount": 20000}}'}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}})


def completion_with_logprob(model: str, logprob: float, content: str = "student-answer") -> httpx.Response:
    """A student's whole answer as one token with ``logprob``: what the cascade judges."""
    return httpx.Response(200, json={
        "id": "x", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content},
                     "logprobs": {"content": [{"token": content, "logprob": logprob, "bytes": None,
                                               "top_logprobs": []}]}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    })


def breaking_student(request: httpx.Request) -> httpx.Response:
    first = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "trans"}}]}
    return httpx.Response(200, text=f"data: {json.dumps(first)}\n\ndata: {{broken\n\n",
                          headers={"content-type": "text/event-stream"})


class CountingApp:
    """ASGI wrapper counting the chat calls an upstream received."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.calls = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/chat/completions"):
            self.calls += 1
        await self.app(scope, receive, send)


def group_members(pgid: int) -> list[int]:
    """Live pids whose process group is ``pgid`` (zombies excluded)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def make_adapter(base_dir: Path, out_dir: Path, seed: int, rank: int = 8) -> Path:
    """An untrained adapter with random (non-zero) weights: enough to tell versions apart."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.train import DEFAULT_TARGET_MODULES

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=DEFAULT_TARGET_MODULES, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(out_dir), save_embedding_layers=False)
    return out_dir


def failing_student(request: httpx.Request) -> httpx.Response:
    return httpx.Response(500, json={"error": {"message": "engine dead"}})


def fake_adapter(directory: Path) -> str:
    """An adapter directory that passes the swap's checks (config, rank, whole safetensors)."""
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"r": 8}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (directory / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    return str(directory)
