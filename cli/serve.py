"""``distillgate serve``: the gateway and, on the embedded default, what it stands on.

With ``replay_teacher.launch`` the replay teacher (the stand-in for the frontier API) runs
as a child process; with ``vllm.launch`` the student base model is built if missing and a
real vLLM server runs as a child. The gateway starts at once and serves from the teacher
until the student is up: student failures, including "not started yet", fall back.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cli import security
from core.config import Settings, settings_for_command

logger = logging.getLogger(__name__)


class StrayServer(RuntimeError):
    """A child's port is taken: refuse rather than silently use what answers there."""


def _child(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """A child in its own process group that dies with this process (gateway/child_guard.py)."""
    from gateway.child_guard import guarded

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        return subprocess.Popen(guarded(args), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)


def _start_replay_teacher(settings: Settings, log_dir: Path) -> subprocess.Popen[bytes] | None:
    options = settings.replay_teacher
    if options is None or not options.launch:
        return None
    command = [
        sys.executable, "-m", "cli.main", "replay-teacher",
        "--dataset", str(options.dataset), "--port", str(options.port),
        "--latency-ms", str(options.latency_ms), "--latency-jitter-ms", str(options.latency_jitter_ms),
        "--error-rate", str(options.error_rate), "--accuracy", str(options.accuracy), "--seed", str(options.seed),
    ]
    from gateway.child_guard import port_in_use

    if port_in_use("127.0.0.1", options.port):
        raise StrayServer(f"replay_teacher.port {options.port} is already in use (a stray replay teacher from an "
                          "earlier run?); stop it or choose another port")
    logger.info("starting the replay teacher (stand-in for the frontier API)", extra={"port": options.port})
    child = _child(command, log_dir / "replay-teacher.log")
    # The stand-in for an API that is always up: the gateway is not ready before it answers
    # (a first request routed to it before then failed all its retries in a loaded test run).
    from harness.children import wait_ready

    try:
        wait_ready(child, f"http://127.0.0.1:{options.port}/health", log_dir / "replay-teacher.log", timeout_s=120)
    except RuntimeError:
        _stop(child)
        raise
    return child


def _ensure_student_base(config_path: Path, settings: Settings) -> None:
    model_dir = settings.vllm.model_dir
    if (model_dir / "config.json").exists():
        return
    route = settings.routes[0].name
    logger.info("building the student base model", extra={"dir": str(model_dir), "route": route})
    subprocess.run(
        [sys.executable, "-m", "cli.main", "init-student", "--config", str(config_path), "--route", route,
         "--out", str(model_dir)],
        check=True,
    )


def _ensure_router_embedder(config_path: Path, settings: Settings) -> None:
    """Build the router's embedder on first start, in a child: the gateway never loads torch."""
    from router.artifacts import is_built

    if is_built(settings.router.artifacts_dir, settings.router.embedder):
        return
    logger.info("building the router's embedder", extra={"embedder": settings.router.embedder})
    subprocess.run([sys.executable, "-m", "cli.main", "init-router", "--config", str(config_path)], check=True)


def _start_vllm(settings: Settings, log_dir: Path) -> Any:
    if not settings.vllm.launch:
        return None
    from gateway.vllm_process import VLLMProcess

    vllm = settings.vllm
    port = int(vllm.url.rsplit(":", 1)[1].split("/")[0])
    process = VLLMProcess(vllm.python, vllm.model_dir, port, served_model_name=vllm.served_model_name,
                          max_model_len=vllm.max_model_len, max_lora_rank=vllm.max_lora_rank,
                          max_loras=vllm.max_loras, extra_args=vllm.extra_args, log_path=log_dir / "vllm.log")
    logger.info("starting vLLM for the student", extra={"url": vllm.url, "log": str(log_dir / "vllm.log")})
    process.start()  # refuses a port another server holds (VLLMStartError)
    return process


def _secured_app(args: argparse.Namespace, settings: Settings, host: str) -> Any:
    """The app, or None after saying why serving on ``host`` is refused. The admin and
    metrics tokens leave the environment here, before any child starts."""
    from gateway.app import Components, create_app

    announcement = security.prepare_admin_token(settings)
    if announcement:
        print(announcement, flush=True)
    app = create_app(settings, Components(config_path=Path(args.config)))
    security.scrub_secrets(settings)
    problems = security.exposure_problems(host, app.state.auth_required, app.state.metrics.scrape_token is not None)
    if problems and not args.insecure:
        print(security.refusal_message(host, problems), file=sys.stderr)
        return None
    if problems:
        logger.warning("serving beyond loopback with --insecure", extra={"host": host, "problems": problems})
    return app


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = settings_for_command(args.config)
    if settings is None:
        return 2
    if settings.store.kind == "postgres":
        settings.store.dsn()  # an unset DSN variable is a ConfigError now, not a failed startup later
    log_dir = Path(args.log_dir)
    host = args.host or settings.server.host
    app = _secured_app(args, settings, host)
    if app is None:
        return 2
    children: list[Any] = []
    try:
        _ensure_router_embedder(Path(args.config), settings)
        if settings.vllm.launch:
            _ensure_student_base(Path(args.config), settings)
        try:
            children += [child for child in (_start_replay_teacher(settings, log_dir),) if child is not None]
            vllm = _start_vllm(settings, log_dir)
        except RuntimeError as error:  # StrayServer, VLLMStartError, a replay teacher that never answered
            print(f"distillgate serve: {error}", file=sys.stderr, flush=True)
            return 2
        if vllm is not None:
            children.append(vllm)
        # The app was built before any child started (secrets leave the environment first);
        # its lifespan, run by uvicorn below, supervises the vLLM server started since.
        app.state.components.vllm_process = vllm
        # uvicorn drains on SIGTERM, then re-raises the signal; exit through the finally
        # below instead, so the children are stopped too and the exit status is 0.
        signal.signal(signal.SIGTERM, _exit_cleanly)
        uvicorn.run(app, host=host, port=args.port or settings.server.port, log_level="warning",
                    timeout_graceful_shutdown=30, **security.uvicorn_options(settings))
    finally:
        for child in children:
            _stop(child)
    return 0


def _exit_cleanly(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _stop(child: Any) -> None:
    if hasattr(child, "stop"):
        child.stop()
        return
    child.terminate()  # the guard forwards it to the server
    deadline = time.monotonic() + 10
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if child.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)  # the whole group: the guard and the server
        child.wait()


def check_config(args: argparse.Namespace) -> int:
    settings = settings_for_command(args.config)
    if settings is None:
        return 2
    print(f"{args.config}: ok ({len(settings.routes)} route(s): {', '.join(r.name for r in settings.routes)})")
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("serve", help="run the gateway (and its student/teacher children)")
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--log-dir", default="var/logs")
    parser.add_argument("--insecure", action="store_true",
                        help="serve beyond loopback even with no client keys or an open /metrics")
    parser.set_defaults(func=serve)
    check = subparsers.add_parser("check-config", help="validate a config file")
    check.add_argument("--config", default="configs/default.yaml")
    check.set_defaults(func=check_config)
