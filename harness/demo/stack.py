"""The demo's own stack: a gateway (which starts the replay teacher and vLLM as its children)
on a config derived from the default one, plus a zero-latency reference teacher for the
all-teacher counterfactual.

The stack does not depend on the caller's shell: every ``DISTILLGATE_*`` variable is left
out of the children's environment, and the gateway gets a client key and an admin token
made for this run (a user's ``DISTILLGATE_API_KEYS`` would otherwise make every demo request
a 401).
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.config import Settings, parse_settings
from harness.children import ROOT, Child, free_port, python_module
from harness.demo.options import DemoOptions
from harness.demo.tools_route import add_tool_route

ENV_PREFIX = "DISTILLGATE_"


# The held-out queries are sent with a key not trusted for training: they measure the
# versions the stream produced, and no version is trained on them while they run.
EVALUATION_KEY_ENV = "DISTILLGATE_DEMO_EVALUATION_KEY"


@dataclass(frozen=True)
class Credentials:
    """The client keys and admin token of the demo's gateway, made for one run."""

    client_key: str
    admin_token: str
    evaluation_key: str

    @classmethod
    def generate(cls) -> Credentials:
        return cls(client_key=f"demo-{secrets.token_urlsafe(18)}", admin_token=secrets.token_urlsafe(24),
                   evaluation_key=f"demo-eval-{secrets.token_urlsafe(18)}")


@dataclass
class Stack:
    children: list[Child]
    gateway_url: str
    reference_url: str
    settings: Settings
    credentials: Credentials

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


def _absolute(path: str | Path) -> str:
    return str(path if Path(path).is_absolute() else ROOT / path)


def demo_config(options: DemoOptions, gateway_port: int, teacher_port: int, vllm_port: int) -> dict[str, Any]:
    """The default config with the demo's ports, store, replay teacher and schedule; the
    route's prices, thresholds, training and gate stay as the default config sets them."""
    base = yaml.safe_load(options.config.read_text())
    route = base["routes"][0]
    route["teacher"].pop("api_base", None)  # the launched replay teacher's, from its port
    if options.shadow_rate is not None:
        route["shadow_rate"] = options.shadow_rate
    if (drift := options.drift_overrides()) is not None:
        route["drift"] = {**(route.get("drift") or {}), **drift}
    training = route.setdefault("training", {})
    training["interval_minutes"] = options.interval_minutes
    if options.min_new_examples is not None:
        training["min_new_examples"] = options.min_new_examples
    # Only the demo's own keys: keys with policies from the base config name variables the
    # caller's shell may or may not hold.
    base.setdefault("auth", {})["keys"] = [{"key_env": EVALUATION_KEY_ENV, "trusted_for_training": False}]
    # The demo's key is its own app's: what it sends is what the student should learn.
    base["auth"]["client_keys_trusted_for_training"] = True
    base.setdefault("server", {})["port"] = gateway_port
    # The demo's versions are its own: in the checkout's var/adapters they would overwrite (v1,
    # v2, ...) the adapters of a gateway run from the same directory.
    base.setdefault("store", {}).update(path=str(options.out / "distillgate.db"),
                                        adapters_dir=str(options.out / "adapters"))
    vllm = base.setdefault("vllm", {})
    vllm.update(url=f"http://127.0.0.1:{vllm_port}", model_dir=_absolute(vllm.get("model_dir", "var/models/base")),
                python=_absolute(vllm.get("python", ".venv-vllm/bin/python")))
    route.setdefault("student", {}).pop("base_model", None)  # vllm.model_dir names it
    if options.tools:
        add_tool_route(base, options.tools_min_new_examples)
    base["replay_teacher"] = {**(base.get("replay_teacher") or {}), "launch": True, "port": teacher_port,
                              "latency_ms": options.teacher_latency_ms,
                              "latency_jitter_ms": options.teacher_latency_ms / 3,
                              "accuracy": options.teacher_accuracy, "seed": options.seed,
                              "dataset": str(options.dataset)}
    return base


def gateway_environment(settings: Settings, credentials: Credentials) -> dict[str, str]:
    """The auth variables the demo's gateway reads, set to this run's credentials."""
    return {settings.auth.client_keys_env: credentials.client_key,
            settings.auth.admin_token_env: credentials.admin_token,
            EVALUATION_KEY_ENV: credentials.evaluation_key}


def ensure_student_base(config_path: Path, settings: Settings, log_path: Path) -> bool:
    """Build the student base model (once) before the gateway starts, so that the gateway's
    start is not timed together with a build of unknown length on a loaded machine. Returns
    whether it built one."""
    if (Path(settings.vllm.model_dir) / "config.json").exists():
        return False
    env = {name: value for name, value in os.environ.items() if not name.startswith(ENV_PREFIX)}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log_file:
        subprocess.run(python_module("cli.main", "init-student", "--config", str(config_path), "--route",
                                     settings.routes[0].name, "--out", str(settings.vllm.model_dir)),
                       check=True, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, stdout=log_file,
                       stderr=subprocess.STDOUT)
    return True


def start_stack(options: DemoOptions, *, launch_vllm: bool = True, gateway_timeout_s: float = 300.0,
                progress: Callable[[str], object] = print) -> Stack:
    """Write ``demo.yaml`` under ``options.out``, build the student base if missing, and start
    the reference teacher and the gateway."""
    gateway_port, teacher_port, vllm_port, reference_port = free_port(), free_port(), free_port(), free_port()
    config = demo_config(options, gateway_port, teacher_port, vllm_port)
    config["vllm"]["launch"] = launch_vllm
    settings = parse_settings(config, options.config)
    credentials = Credentials.generate()
    config_path = options.out / "demo.yaml"
    config_path.write_text(yaml.safe_dump(config))
    logs = options.out / "logs"
    if launch_vllm and not (Path(settings.vllm.model_dir) / "config.json").exists():
        progress(f"building the student base model once (log: {logs / 'init-student.log'})")
        ensure_student_base(config_path, settings, logs / "init-student.log")
    progress("starting the gateway (it starts the replay teacher and vLLM)")
    reference = Child(
        python_module("cli.main", "--log-level", "WARNING", "replay-teacher", "--dataset", str(options.dataset),
                      "--port", str(reference_port), "--accuracy", str(options.teacher_accuracy),
                      "--seed", str(options.seed)),
        f"http://127.0.0.1:{reference_port}/health", logs / "reference-teacher.log", scrub_prefixes=[ENV_PREFIX])
    gateway = Child(
        python_module("cli.main", "serve", "--config", str(config_path), "--log-dir", str(logs)),
        f"http://127.0.0.1:{gateway_port}/healthz", logs / "gateway.log",
        env=gateway_environment(settings, credentials), scrub_prefixes=[ENV_PREFIX])
    children = [reference.start()]
    try:
        children.append(gateway.start(timeout_s=gateway_timeout_s))
    except BaseException:
        gateway.stop()
        reference.stop()
        raise
    return Stack(children, f"http://127.0.0.1:{gateway_port}", f"http://127.0.0.1:{reference_port}", settings,
                 credentials)
