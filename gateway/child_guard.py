"""Run a child server so that it dies with the gateway, even when the gateway is SIGKILLed.

``python -m gateway.child_guard <gateway pid> -- <command...>`` is what the gateway starts in a
new session (its own process group); the guard runs the command in that same group and:

* asks the kernel for a signal when its parent dies (``prctl(PR_SET_PDEATHSIG)``); a
  SIGKILLed gateway cannot clean up, the kernel still tells the guard;
* also checks its parent every ``POLL_S`` (the death signal fires when the *thread* that
  forked the guard exits, and it is lost if the parent died before ``prctl``): a signal is
  acted on only when the parent really is gone;
* then SIGKILLs its whole process group: the server and whatever the server forked (vLLM's
  engine core, which a death signal on the server alone would not reach);
* forwards SIGTERM/SIGINT to the server (a graceful stop) and exits with its status.

No dependency beyond the standard library: this starts in a few milliseconds.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from types import FrameType

PR_SET_PDEATHSIG = 1
PARENT_DIED_SIGNAL = signal.SIGUSR1
POLL_S = 0.5


def guarded(command: list[str], python: str = sys.executable) -> list[str]:
    """``command`` wrapped so that it dies with the calling process. Run by path in isolated
    mode (``-I``): it imports only the standard library, whatever the child's environment."""
    return [python, "-I", os.path.abspath(__file__), str(os.getpid()), "--", *command]


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port`` (a stray server from an earlier run)."""
    import socket

    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def guarded_child_pid(guard_pid: int) -> int | None:
    """The pid of the server a guard runs (Linux ``/proc``), None when it has none."""
    try:
        with open(f"/proc/{guard_pid}/task/{guard_pid}/children") as children:
            pids = children.read().split()
    except OSError:
        return None
    return int(pids[0]) if pids else None


def _set_parent_death_signal(signum: int = PARENT_DIED_SIGNAL) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the poll below still catches it
        pass


def _die_with_the_guard() -> None:
    """In the server, before exec: should the guard itself be killed, the server goes too."""
    _set_parent_death_signal(signal.SIGKILL)


def _kill_group() -> None:
    os.killpg(os.getpgrp(), signal.SIGKILL)  # the guard included


def run(parent: int, command: list[str]) -> int:
    _set_parent_death_signal()
    child: subprocess.Popen[bytes] | None = None

    def parent_gone() -> bool:
        return os.getppid() != parent

    def on_parent_signal(signum: int, frame: FrameType | None) -> None:
        if parent_gone():
            _kill_group()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(PARENT_DIED_SIGNAL, on_parent_signal)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    if parent_gone():
        return 1
    child = subprocess.Popen(command, preexec_fn=_die_with_the_guard)  # the guard has one thread
    while child.poll() is None:
        if parent_gone():
            _kill_group()
        time.sleep(POLL_S)
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m gateway.child_guard <parent pid> -- <command...>", file=sys.stderr)
        return 2
    return run(int(argv[0]), argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
