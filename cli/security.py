"""What ``distillgate serve`` checks and sets up before it listens.

* Exposure: a gateway listening beyond loopback with no client keys, or with ``/metrics``
  open (no ``DISTILLGATE_METRICS_TOKEN``), serves anyone who can reach it: refused unless
  ``--insecure`` is given.
* The admin token: taken from its variable, else from ``auth.admin_token_file`` (default
  ``admin-token`` beside the store), else generated and written there with mode 0600 (never
  printed: terminals and service managers keep stdout). Once the app holds it, it and the
  metrics token are removed from this process's environment, so no child (replay teacher,
  vLLM, the training runs) inherits them.
* uvicorn's own limits: ``limit_concurrency``, keep-alive, and a header timeout.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path
from typing import Any

from core.config import Settings

# gateway.metrics' name for it; not imported here so that ``distillgate --help`` stays light.
METRICS_TOKEN_ENV = "DISTILLGATE_METRICS_TOKEN"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name may resolve anywhere


def exposure_problems(host: str, auth_required: bool, metrics_token_set: bool) -> list[str]:
    """Why listening on ``host`` would expose the gateway; empty when it would not."""
    if is_loopback(host):
        return []
    problems = []
    if not auth_required:
        problems.append("no client keys are configured, so anyone who can reach it may use (and pay for) every "
                        "route: set DISTILLGATE_API_KEYS or auth.keys")
    if not metrics_token_set:
        problems.append(f"/metrics would be open to anyone: set {METRICS_TOKEN_ENV}")
    return problems


def refusal_message(host: str, problems: list[str]) -> str:
    lines = [f"refusing to serve on {host}, beyond loopback:"]
    lines += [f"  - {problem}" for problem in problems]
    lines.append("listen on 127.0.0.1, fix the above, or pass --insecure to serve openly anyway")
    return "\n".join(lines)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by this user only (0600), never briefly wider."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # an existing file keeps its old mode through O_CREAT
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text + "\n")


def prepare_admin_token(settings: Settings) -> str | None:
    """Make sure an admin token exists; returns a line for the operator, or None when the
    token comes from the environment."""
    if os.environ.get(settings.auth.admin_token_env):
        return None
    path = settings.admin_token_file()
    if settings.admin_token() is not None:
        path.chmod(0o600)
        return f"admin token: in {path} (set {settings.auth.admin_token_env} to choose one)"
    write_private(path, secrets.token_urlsafe(32))
    return f"admin token: generated and written to {path} (mode 0600; set {settings.auth.admin_token_env} to choose one)"


def scrub_secrets(settings: Settings) -> None:
    """Remove the admin and metrics tokens from the environment children inherit."""
    for name in (settings.auth.admin_token_env, METRICS_TOKEN_ENV):
        os.environ.pop(name, None)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    from gateway.limits import header_timeout_protocol

    server = settings.server
    # log_config None: uvicorn's own records go through the root handler (JSON) too.
    return {"http": header_timeout_protocol(server.header_timeout_s), "limit_concurrency": server.limit_concurrency,
            "timeout_keep_alive": server.keep_alive_s, "log_config": None}
