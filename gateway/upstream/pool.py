"""The student's servers (``vllm.urls``) behind one backend: balancing, a breaker each, recovery.

* Balancing: each request goes to the server with the fewest requests outstanding from
  this gateway, ties broken in turn (round-robin). vLLM batches continuously, so a server's
  latency grows with what it is already generating, and answers vary in length: counting
  what is outstanding steers work away from a slow or busy server, which plain round-robin
  does not; with equal load it is round-robin. (Envoy's and nginx's least-request, with
  the exact minimum since a route has a handful of servers.)
* A breaker per server (gateway/upstream/breaker.py): the pool records each call's outcome
  on the breaker of the server that served it, and skips servers whose breaker is open. A
  request whose connection was refused (nothing was sent) is tried on the next server;
  any other failure goes back to the caller, which serves it from the teacher.
* Recovery: before a server whose breaker opened takes traffic again, the live adapters
  are loaded into it (``adapters``, the swapper's view of what is live). A server that
  answers 404 for a live adapter restarted too quickly for its breaker to notice: the live
  adapters are loaded into it again in the background (at most every ``RELOAD_INTERVAL_S``),
  and meanwhile the request is tried on another server. A 404 is not a server fault: the
  breaker stays closed (a route pointing at a version no server has must not open it).

One server is the one-server case of the same code (``vllm.url``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from core.config import BreakerConfig
from core.tasks import cancel_and_wait
from core.upstream import Completion, StudentBackend, UpstreamFailure
from gateway.upstream.breaker import BreakerState, StudentBreaker

logger = logging.getLogger(__name__)

RELOAD_INTERVAL_S = 5.0


class LiveAdapters(Protocol):
    """What is live, per route (``gateway.training.swap.Swapper`` fits)."""

    def live_adapter_names(self) -> set[str]: ...

    async def live_adapters(self) -> dict[str, str]:
        """Adapter name -> adapter directory, for every route's live version."""
        ...


async def load_adapter_once(client: StudentBackend, name: str, path: str) -> None:
    """``load_lora_adapter``; a server that already has the name (it outlived a restart of
    the gateway, or a blip of the network) is fine."""
    try:
        await client.load_adapter(name, path)
    except UpstreamFailure as error:
        if error.status_code == 400 and "already" in str(error).lower():
            logger.info("adapter already loaded", extra={"adapter": name})
            return
        raise


@dataclass(eq=False)
class StudentServer:
    url: str
    client: StudentBackend
    breaker: StudentBreaker
    outstanding: int = 0  # requests from this gateway not yet answered
    requests: int = 0  # requests sent, for the balance (metrics, /readyz)
    reloading: asyncio.Task[bool] | None = None  # live adapters being loaded again after a 404
    reloaded_at: float = float("-inf")

    def describe(self) -> dict[str, Any]:
        return {**self.breaker.describe(), "outstanding": self.outstanding, "requests": self.requests}


class StudentPool:
    """A ``StudentBackend`` over several servers serving the same base model and adapters."""

    def __init__(self, clients: Sequence[tuple[str, StudentBackend]], config: BreakerConfig, probe_model: str) -> None:
        if not clients:
            raise ValueError("a student pool needs at least one server")
        self.servers: list[StudentServer] = []
        for url, client in clients:
            breaker = StudentBreaker(client, config, probe_model, server=url)
            server = StudentServer(url, client, breaker)
            breaker.on_recover = partial(self._recover, server)
            self.servers.append(server)
        self.adapters: LiveAdapters | None = None  # set once the swapper exists
        self._turn = 0

    # -- choosing a server ---------------------------------------------------------------
    def members(self) -> list[tuple[str, StudentBackend]]:
        """(url, client) of every server: what a hot swap loads adapters into."""
        return [(server.url, server.client) for server in self.servers]

    def available(self) -> bool:
        """Whether some server would take a request now (the others' breakers are open)."""
        return any(server.breaker.can_admit() for server in self.servers)

    def _pick(self, tried: list[StudentServer]) -> StudentServer | None:
        while True:
            candidates = [server for server in self.servers if server not in tried and server.breaker.can_admit()]
            if not candidates:
                return None
            fewest = min(server.outstanding for server in candidates)
            tied = [server for server in candidates if server.outstanding == fewest]
            server = tied[self._turn % len(tied)]
            self._turn += 1
            if server.breaker.allow():  # a half-open server's one trial: taken here
                return server
            tried = [*tried, server]

    def _unavailable(self) -> UpstreamFailure:
        # Not a server fault of its own: every server is already out of service.
        return UpstreamFailure("no student server is available: every server's breaker is open", server_fault=False)

    @property
    def max_model_len(self) -> int | None:
        """The servers' context length (they serve one base model)."""
        return getattr(self.servers[0].client, "max_model_len", None)

    def _failed(self, server: StudentServer, model: str, failure: UpstreamFailure) -> bool:
        """Record a failed call; True when another server may take the request (nothing was
        sent, or the server lacks a live adapter: it restarted)."""
        server.breaker.record_failure(str(failure), server_fault=failure.server_fault)
        lost = (failure.status_code == 404 and self.adapters is not None
                and model in self.adapters.live_adapter_names())
        if lost:
            self._reload_soon(server)
        return failure.unreached or lost

    def _reload_soon(self, server: StudentServer) -> None:
        if server.reloading is not None and not server.reloading.done():
            return
        if time.monotonic() - server.reloaded_at < RELOAD_INTERVAL_S:
            return
        server.reloaded_at = time.monotonic()
        logger.warning("student server lacks a live adapter (restarted?): loading the live adapters again",
                       extra={"server": server.url})
        server.reloading = asyncio.create_task(self._recover(server), name=f"reload-adapters {server.url}")

    # -- the StudentBackend calls --------------------------------------------------------
    async def chat(self, model: str, body: dict[str, Any], timeout_s: float) -> Completion:
        tried: list[StudentServer] = []
        unreached: UpstreamFailure | None = None
        while (server := self._pick(tried)) is not None:
            tried.append(server)
            server.outstanding += 1
            server.requests += 1
            try:
                completion = await server.client.chat(model, body, timeout_s)
            except UpstreamFailure as failure:
                if not self._failed(server, model, failure):
                    raise
                unreached = failure  # the next server may answer
                continue
            finally:
                server.outstanding -= 1
            server.breaker.record_success()
            return completion
        raise unreached or self._unavailable()

    async def stream(self, model: str, body: dict[str, Any], timeout_s: float) -> AsyncIterator[dict[str, Any]]:
        tried: list[StudentServer] = []
        unreached: UpstreamFailure | None = None
        while (server := self._pick(tried)) is not None:
            tried.append(server)
            chunks = 0
            server.outstanding += 1
            server.requests += 1
            try:
                async with contextlib.aclosing(server.client.stream(model, body, timeout_s)) as upstream:
                    async for chunk in upstream:
                        chunks += 1
                        if chunks == 1:
                            server.breaker.record_success()
                        yield chunk
            except UpstreamFailure as failure:
                if not self._failed(server, model, failure) or chunks > 0:
                    raise
                unreached = failure
                continue
            finally:
                server.outstanding -= 1
            if chunks == 0:
                server.breaker.record_failure("the stream ended before its first chunk")
            return
        raise unreached or self._unavailable()

    async def fits_context(self, model: str, body: dict[str, Any]) -> bool:
        """Every server serves the same base model: one answers for all (see VLLMStudent)."""
        server = next((server for server in self.servers if server.breaker.can_admit()), self.servers[0])
        fits = getattr(server.client, "fits_context", None)
        return True if fits is None else bool(await fits(model, body))

    async def healthy(self) -> bool:
        """Whether any server answers its health check."""
        return any(await asyncio.gather(*(server.client.healthy() for server in self.servers)))

    async def load_adapter(self, name: str, path: str) -> None:
        """Load on every server; UpstreamFailure naming the servers that failed."""
        await self._everywhere(lambda client: load_adapter_once(client, name, path), "load")

    async def unload_adapter(self, name: str) -> None:
        await self._everywhere(lambda client: client.unload_adapter(name), "unload")

    async def _everywhere(self, call: Callable[[StudentBackend], Awaitable[None]], what: str) -> None:
        results = await asyncio.gather(*(call(server.client) for server in self.servers), return_exceptions=True)
        failed = [f"{server.url}: {result}" for server, result in zip(self.servers, results, strict=True)
                  if isinstance(result, UpstreamFailure)]
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, UpstreamFailure):
                raise result
        if failed:
            raise UpstreamFailure(f"adapter {what} failed on {len(failed)} of {len(self.servers)} servers: "
                                  + "; ".join(failed))

    # -- recovery ------------------------------------------------------------------------
    def take_out(self, url: str, reason: str) -> None:
        """Keep a server out of service until the live adapters are loaded into it."""
        for server in self.servers:
            if server.url == url:
                server.breaker.force_open(reason)

    async def _recover(self, server: StudentServer) -> bool:
        """Load every live adapter into a server that answers its probe again."""
        if self.adapters is None:
            return True
        adapters = await self.adapters.live_adapters()
        try:
            for name, path in adapters.items():
                await load_adapter_once(server.client, name, path)
        except UpstreamFailure as failure:
            logger.warning("student server answers but the live adapters did not load; it stays out",
                           extra={"server": server.url, "error": str(failure)[:300]})
            return False
        if adapters:
            logger.info("live adapters loaded into a returning student server",
                        extra={"server": server.url, "adapters": sorted(adapters)})
        return True

    # -- lifecycle and reporting ---------------------------------------------------------
    def start(self) -> None:
        for server in self.servers:
            server.breaker.start()

    async def close(self) -> None:
        for server in self.servers:
            await server.breaker.close()
            await cancel_and_wait(server.reloading)

    async def aclose(self) -> None:
        for server in self.servers:
            await server.client.aclose()

    def describe(self) -> dict[str, Any]:
        """The best server's breaker state (the student is usable while any server is), the
        totals, and each server."""
        breakers = [server.breaker for server in self.servers]
        return {"state": min(breaker.state for breaker in breakers).name,
                "consecutive_failures": min(breaker.consecutive_failures for breaker in breakers),
                "opened_total": sum(breaker.opened_total for breaker in breakers),
                "ignored_failures": sum(breaker.ignored_failures for breaker in breakers),
                "last_failure": next((b.last_failure for b in breakers if b.state is not BreakerState.closed),
                                     breakers[0].last_failure),
                "servers": [server.describe() for server in self.servers]}


def build_student_pool(urls: Sequence[str], config: BreakerConfig, probe_model: str,
                       max_model_len: int | None = None) -> StudentPool:
    """One ``VLLMStudent`` per URL, behind one pool."""
    from gateway.upstream.student import VLLMStudent

    clients = [(url, VLLMStudent(url, max_model_len=max_model_len)) for url in urls]
    return StudentPool(clients, config, probe_model)
