"""A real PostgreSQL server for the tests (a pytest plugin module), from Debian's
``postgresql`` package (``make postgres`` installs it).

* ``postgres_server``: one server per session: ``initdb`` into a fresh directory under /tmp,
  ``postgres`` on a free loopback port, trust authentication on loopback only, no fsync
  (a test server: durability is not what these tests measure).
* ``postgres_dsn``: a fresh, empty database on it for each test, dropped afterwards.
* ``store_backend``: parametrizes a test over both back-ends; ``backend.open()`` opens (or
  reopens) the test's store.

initdb refuses to run as root; the tests run as root in CI (``.ci/run``), so the server is
run as the ``postgres`` system user the Debian package creates (``runuser -u postgres``), in
a directory it owns under /tmp (pytest's own temp root is private to the calling user).

Missing binaries fail the test with what to do, never a silent skip: the PostgreSQL tests
are skipped only when ``DISTILLGATE_SKIP_POSTGRES=1`` says so.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port

OPT_OUT = "DISTILLGATE_SKIP_POSTGRES"
SERVER_USER = "postgres"  # Debian's package creates it; used only when the tests run as root


def _bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda path: int(path.parts[-3]))
    return found[-1].parent if found else None


def _unavailable(reason: str) -> None:
    if os.environ.get(OPT_OUT) == "1":
        pytest.skip(f"{reason} ({OPT_OUT}=1)")
    pytest.fail(f"{reason}: run `make postgres` (apt-get install postgresql) and install the postgres extra, "
                f"or set {OPT_OUT}=1 to skip the PostgreSQL tests", pytrace=False)


@dataclass
class PostgresServer:
    port: int
    admin_dsn: str

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"


def _as_server_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", SERVER_USER, "--", *command] if os.geteuid() == 0 else command


def _wait_accepting(dsn: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 30.0) -> None:
    import psycopg

    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"postgres exited: {log.read_text()[-2000:]}")
        try:
            psycopg.connect(dsn, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres not accepting after {timeout_s}s: {log.read_text()[-2000:]}") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = _bindir()
    if bindir is None:
        _unavailable("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin")
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        _unavailable("psycopg / psycopg-pool are not installed")
    assert bindir is not None
    root = Path(tempfile.mkdtemp(prefix="distillgate-pg-"))
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam(SERVER_USER)
        except KeyError:
            shutil.rmtree(root)
            _unavailable(f"running as root, initdb needs the {SERVER_USER!r} system user (Debian's package creates it)")
        os.chown(root, user.pw_uid, user.pw_gid)
    data, log, port = root / "data", root / "server.log", free_port()
    subprocess.run(_as_server_user([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                    "--no-sync", "-E", "UTF8", "--locale=C"]),
                   check=True, capture_output=True)
    command = _as_server_user([str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(root),
                               "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off",
                               "-c", "synchronous_commit=off", "-c", "max_connections=200"])
    with log.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    server = PostgresServer(port, f"postgresql://postgres@127.0.0.1:{port}/postgres")
    try:
        _wait_accepting(server.admin_dsn, process, log)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)  # postgres' "fast" shutdown
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database for one test; dropped (its sessions ended) after it."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server.admin_dsn, autocommit=True) as admin:
        admin.execute(f"create database {name}")
    yield postgres_server.dsn(name)
    with psycopg.connect(postgres_server.admin_dsn, autocommit=True) as admin:
        admin.execute(f"drop database if exists {name} with (force)")


@dataclass
class StoreBackend:
    kind: str
    open: Callable[[], Any]  # a new store on the test's database (a reopen sees what was written)
    dsn: str | None = None


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreBackend]:
    """Each back-end behind the ``Store`` seam; PostgreSQL is the integration tier (a server).
    Every store the test opened is closed after it."""
    opened: list[Any] = []

    def tracked(factory: Callable[[], Any]) -> Callable[[], Any]:
        def open_store() -> Any:
            opened.append(factory())
            return opened[-1]
        return open_store

    if request.param == "sqlite":
        from core.store import SQLiteStore

        yield StoreBackend("sqlite", tracked(lambda: SQLiteStore(tmp_path / "s.db")))
    else:
        from core.store.postgres import PostgresStore

        dsn = request.getfixturevalue("postgres_dsn")
        yield StoreBackend("postgres", tracked(lambda: PostgresStore(dsn, max_size=4)), dsn)
    for store in opened:
        store.close()
