"""The zero-downtime hot swap of a route's student adapter, the way vLLM loads adapters.

Per route, under a lock: validate the adapter directory, ``load_lora_adapter`` under a new
versioned name on every student server (``vllm.urls``), smoke-test one chat request on that
name on each, register the version's OOD detector (and its learned router, when its training
cycle saved one), record the new live version in the store, switch the route's pointer (one assignment on the event loop), then wait until the
requests that chose the old adapter have finished and unload it from every server
(PLATFORM.md: unloading without the drain failed requests). The route switches only when
every server has the new adapter: any failure before the switch (on any one server) unloads
it again where it loaded, leaves the old version serving, marks the candidate ``failed`` and
names the servers that failed; a store write that fails does the same, less the marking.

At gateway start the live adapters are restored into every server; a server that cannot take
them is kept out of service (its breaker opened) until the pool's recovery loads them.

No torch and no FastAPI here: the gateway imports this module at startup.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from core.config import RouteConfig
from core.prompting import student_messages
from core.registry import ROLLED_BACK_NOTE, CandidateVersion, Registry, VersionStore
from core.store import STORE_ERRORS
from core.upstream import UpstreamFailure
from gateway.route_table import (
    BASE_MODEL_VERSION,
    StudentPointer,
    adapter_name,
    calibrated_threshold,
    learned_router_path,
)
from gateway.upstream.pool import load_adapter_once

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
SMOKE_PROMPT = "hello"


class AdapterServer(Protocol):
    """One student server (``gateway.upstream.student.VLLMStudent`` fits). A pool of them
    (``gateway.upstream.pool.StudentPool``) also has ``members()``: the swap works on each."""

    async def chat(self, model: str, body: dict[str, Any], timeout_s: float) -> Any: ...

    async def load_adapter(self, name: str, path: str) -> None: ...

    async def unload_adapter(self, name: str) -> None: ...


class LiveRouteState(Protocol):
    student: StudentPointer | None


class LiveRoutes(Protocol):
    """The gateway's live route pointers (``gateway.route_table.RouteTable`` fits)."""

    def get(self, name: str) -> Any: ...

    def switch_student(self, name: str, pointer: StudentPointer | None) -> StudentPointer | None: ...

    async def wait_drained(self, adapter: str, timeout_s: float = 30.0) -> bool: ...


class DetectorSink(Protocol):
    """Where a version's OOD detector goes (``router.ood_router.OODRouter`` fits).

    Detectors are keyed by (route, version): registering the new one before the pointer
    switch changes nothing until the switch makes that version the one requests see.
    """

    async def aload_detector(self, route: str, version: str, path: str | Path) -> Any: ...

    async def aload_learned(self, route: str, version: str, path: str | Path) -> Any: ...

    def drop_detector(self, route: str, version: str) -> None: ...


class SwapError(Exception):
    """A promotion or rollback did not happen; the previous version keeps serving."""


@dataclass
class SwapResult:
    route: str
    version: str
    previous: str | None
    load_ms: float
    smoke_ms: float
    drain_ms: float
    drained: bool
    unloaded: str | None
    servers: int = 1
    timings: dict[str, float] = field(default_factory=dict)


def validate_adapter_dir(path: Path, max_rank: int) -> None:
    """Raise SwapError unless ``path`` holds a peft LoRA adapter vLLM can load at this rank."""
    config_path = path / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise SwapError(f"adapter {path}: unreadable adapter_config.json ({error})") from None
    rank = config.get("r")
    if not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise SwapError(f"adapter {path}: LoRA rank {rank!r} is outside 1..{max_rank} (vLLM --max-lora-rank)")
    weights = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
    if weights is None:
        raise SwapError(f"adapter {path}: no adapter weights ({' or '.join(WEIGHT_FILES)})")
    if weights.suffix == ".safetensors":
        _check_safetensors(weights)


def _check_safetensors(path: Path) -> None:
    """The header parses and the file is as long as the header says: catches truncation."""
    try:
        with path.open("rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_size))
    except (OSError, ValueError, struct.error) as error:
        raise SwapError(f"adapter weights {path} are corrupt ({error})") from None
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    if not ends or path.stat().st_size < 8 + header_size + max(ends):
        raise SwapError(f"adapter weights {path} are truncated or empty")


class Swapper:
    def __init__(self, student: AdapterServer, routes: LiveRoutes, store: VersionStore, *,
                 route_configs: dict[str, RouteConfig] | None = None, detectors: DetectorSink | None = None,
                 max_lora_rank: int = 8, drain_timeout_s: float = 60.0, smoke_timeout_s: float = 30.0) -> None:
        self.student = student
        self.routes = routes
        self.registry = Registry(store)
        self.route_configs = route_configs or {}
        self.detectors = detectors
        self.max_lora_rank = max_lora_rank
        self.drain_timeout_s = drain_timeout_s
        self.smoke_timeout_s = smoke_timeout_s
        self._locks: dict[str, asyncio.Lock] = {}

    def route_lock(self, route: str) -> asyncio.Lock:
        """Held while this replica changes the route's student; replica sync waits on it too."""
        return self._locks.setdefault(route, asyncio.Lock())

    def _members(self) -> list[tuple[str, AdapterServer]]:
        """(url, server) for each student server: a pool's members, or the one server."""
        members = getattr(self.student, "members", None)
        return members() if members is not None else [("student", self.student)]

    def live_adapter_names(self) -> set[str]:
        """The adapter names the routes send requests to now (the base model is not one)."""
        pointers = (self.routes.get(route).student for route in self.route_configs)
        return {pointer.adapter_name for pointer in pointers
                if pointer is not None and pointer.version != BASE_MODEL_VERSION}

    async def live_adapters(self) -> dict[str, str]:
        """Adapter name -> directory of each route's live version (a returning server's load)."""
        adapters: dict[str, str] = {}
        for route in self.route_configs:
            pointer = self.routes.get(route).student
            if pointer is None or pointer.version == BASE_MODEL_VERSION:
                continue
            version = await asyncio.to_thread(self.registry.get, route, pointer.version)
            if version is not None:
                adapters[pointer.adapter_name] = str(Path(version.adapter_path).resolve())
        return adapters

    async def promote(self, route: str, version: str, *, force: bool = False) -> SwapResult:
        """Make ``version`` the route's serving student; raises SwapError and keeps the old one.

        ``force`` lets an operator promote a version the gate rejected.
        """
        async with self.route_lock(route):
            candidate = self.registry.get(route, version)
            if candidate is None:
                raise SwapError(f"route {route!r} has no version {version!r}")
            if candidate.status == "failed" or (candidate.status == "rejected" and not force):
                raise SwapError(f"version {version} of {route} is {candidate.status}; it cannot be promoted")
            return await self._swap(candidate)

    async def rollback(self, route: str) -> SwapResult:
        """Serve the version that served before the live one again."""
        async with self.route_lock(route):
            live = self.registry.live(route)
            target = self.registry.rollback_target(route)
            if live is None or target is None:
                raise SwapError(f"route {route!r} has no earlier version to roll back to")
            result = await self._swap(target)
            self.registry.mark(route, live.version, "retired", note=ROLLED_BACK_NOTE)
            return result

    async def load_canary(self, route: str, version: str) -> StudentPointer:
        """Load a candidate beside the live version (validated, smoke-tested, its detector
        registered for a later promotion); returns its pointer. Switches nothing: the canary
        rollout decides what it serves. Raises SwapError and marks the candidate ``failed``."""
        async with self.route_lock(route):
            candidate = self.registry.get(route, version)
            if candidate is None or candidate.status != "candidate":
                raise SwapError(f"version {version} of {route} is not a candidate")
            name = adapter_name(route, version)
            await self._load_checked(candidate, name)
            learned = await self._smoke_checked(candidate, name)
            return StudentPointer(version, name, calibrated_threshold(candidate.metrics), learned)

    async def unload_canary(self, route: str, pointer: StudentPointer, status: str, note: str) -> bool:
        """Retire a canary nothing routes to any more: drain, unload, drop its detector, and
        mark the version (``rejected`` by the test, ``candidate`` when an operator ended it).
        Returns whether it drained in time."""
        async with self.route_lock(route):
            drained, _ = await self.retire(route, pointer)
            self.registry.mark(route, pointer.version, status, note=note[:500])
            return drained

    async def _swap(self, candidate: CandidateVersion) -> SwapResult:
        route, version = candidate.route, candidate.version
        name = adapter_name(route, version)
        previous = self.routes.get(route).student
        if previous is not None and previous.version == version:
            raise SwapError(f"version {version} of {route} is already serving")
        started = time.perf_counter()
        await self._load_checked(candidate, name)
        loaded = time.perf_counter()
        learned = await self._smoke_checked(candidate, name)
        smoked = time.perf_counter()
        await self._record_live(candidate, name)
        # The switch: from here on new requests choose the new adapter (and its detector).
        self.routes.switch_student(route, StudentPointer(version, name, calibrated_threshold(candidate.metrics),
                                                         learned))
        logger.info("student promoted", extra={"route": route, "version": version,
                                               "previous": previous.version if previous else None})
        drained, unloaded = await self.retire(route, previous)
        finished = time.perf_counter()
        return SwapResult(route, version, previous.version if previous else None,
                          load_ms=(loaded - started) * 1000, smoke_ms=(smoked - loaded) * 1000,
                          drain_ms=(finished - smoked) * 1000, drained=drained, unloaded=unloaded,
                          servers=len(self._members()))

    async def _load_checked(self, candidate: CandidateVersion, name: str) -> None:
        """Validate the adapter and load it on every server; on failure mark it ``failed``."""
        try:
            validate_adapter_dir(Path(candidate.adapter_path), self.max_lora_rank)
            await self._load_everywhere(name, candidate.adapter_path)
        except (SwapError, UpstreamFailure) as error:
            self._fail(candidate, f"load failed: {error}")
            raise SwapError(f"version {candidate.version} of {candidate.route} did not load: {error}") from error

    async def _smoke_checked(self, candidate: CandidateVersion, name: str) -> dict[str, Any] | None:
        """Smoke-test the loaded adapter and register its routers (see ``_load_routers``); on
        failure unload it again and mark it ``failed``."""
        try:
            await self._smoke_test(candidate.route, name)
            return await self._load_routers(candidate)
        except (SwapError, UpstreamFailure, OSError, ValueError, KeyError) as error:
            await self._unload_quietly(name)
            self._fail(candidate, f"smoke test failed: {error}")
            raise SwapError(f"version {candidate.version} of {candidate.route} failed its smoke test: "
                            f"{error}") from error

    async def _load_routers(self, candidate: CandidateVersion) -> dict[str, Any] | None:
        """Register the version's OOD detector and learned router, keyed by its version (so
        nothing changes before the switch); returns the learned router's summary, or None."""
        if self.detectors is None:
            return None
        route, version = candidate.route, candidate.version
        if candidate.detector_path:
            await self.detectors.aload_detector(route, version, candidate.detector_path)
        path = learned_router_path(candidate.metrics)
        if path is None:
            return None
        await self.detectors.aload_learned(route, version, path)
        return {key: value for key, value in candidate.metrics["learned_router"].items() if key != "path"}

    async def _record_live(self, candidate: CandidateVersion, name: str) -> None:
        """Write the new live version to the store *before* the pointer switches, so memory
        and store never disagree: when the write fails, nothing was switched, the new
        adapter is unloaded again and the old version keeps serving (the candidate keeps its
        status: the store failed, not the version)."""
        try:
            await asyncio.to_thread(self.registry.set_live, candidate.route, candidate.version)
        except (*STORE_ERRORS, OSError) as error:
            logger.error("store write failed at promotion; the old version keeps serving",
                         extra={"route": candidate.route, "version": candidate.version, "error": str(error)})
            await self._unload_quietly(name)
            if self.detectors is not None:
                self.detectors.drop_detector(candidate.route, candidate.version)
            raise SwapError(f"version {candidate.version} of {candidate.route} was not recorded as live "
                            f"({type(error).__name__}: {error}); the old version keeps serving") from error

    async def _load_on_members(self, name: str, path: str) -> list[tuple[str, UpstreamFailure]]:
        """Load on every server at once; (url, failure) for each that did not take it."""
        members = self._members()
        resolved = str(Path(path).resolve())
        results = await asyncio.gather(*(load_adapter_once(server, name, resolved) for _url, server in members),
                                       return_exceptions=True)
        failed = []
        for (url, _server), result in zip(members, results, strict=True):
            if isinstance(result, UpstreamFailure):
                failed.append((url, result))
            elif isinstance(result, BaseException):
                raise result
        return failed

    async def _load_everywhere(self, name: str, path: str) -> None:
        """Every server has the adapter, or none keeps it (SwapError naming those that failed)."""
        failed = await self._load_on_members(name, path)
        if failed:
            await self._unload_quietly(name, skip={url for url, _failure in failed})
            raise SwapError(f"not loaded on {len(failed)} of {len(self._members())} student servers: "
                            + "; ".join(f"{url}: {failure}" for url, failure in failed))

    async def _smoke_test(self, route: str, name: str) -> None:
        """One real chat request on the new adapter name before any client is sent to it."""
        config = self.route_configs.get(route)
        system_prompt = config.student.system_prompt if config else ""
        body = {"messages": student_messages(system_prompt, [{"role": "user", "content": SMOKE_PROMPT}]),
                "max_tokens": 4, "temperature": 0.0}
        members = self._members()
        results = await asyncio.gather(*(server.chat(name, body, self.smoke_timeout_s) for _url, server in members),
                                       return_exceptions=True)
        failed = []
        for (url, _server), result in zip(members, results, strict=True):
            if isinstance(result, UpstreamFailure):
                failed.append(f"{url}: {result}")
            elif isinstance(result, BaseException):
                raise result
            elif not (getattr(result, "body", None) or {}).get("choices"):
                failed.append(f"{url}: the smoke-test answer has no choices")
        if failed:
            raise SwapError(f"failed on {len(failed)} of {len(members)} student servers: " + "; ".join(failed))

    async def retire(self, route: str, previous: StudentPointer | None) -> tuple[bool, str | None]:
        """Drain the old adapter's in-flight requests, then unload it (never the base model)."""
        if previous is None or previous.version == BASE_MODEL_VERSION:
            return True, None
        drained = await self.routes.wait_drained(previous.adapter_name, self.drain_timeout_s)
        if not drained:
            # Unloading anyway bounds vLLM's adapter slots; the stragglers fall back to the teacher.
            logger.warning("old adapter did not drain in time; unloading anyway",
                           extra={"route": route, "adapter": previous.adapter_name})
        await self._unload_quietly(previous.adapter_name)
        if self.detectors is not None:
            self.detectors.drop_detector(route, previous.version)
        return drained, previous.adapter_name

    async def _unload_quietly(self, name: str, skip: set[str] | None = None) -> None:
        """Unload from every server (but ``skip``); a failure is logged, not raised."""
        members = [(url, server) for url, server in self._members() if url not in (skip or set())]
        results = await asyncio.gather(*(server.unload_adapter(name) for _url, server in members),
                                       return_exceptions=True)
        for (url, _server), result in zip(members, results, strict=True):
            if isinstance(result, UpstreamFailure):
                # Not fatal: the name is no longer routed to; vLLM only holds the slot.
                logger.warning("adapter unload failed", extra={"adapter": name, "server": url, "error": str(result)})
            elif isinstance(result, BaseException):
                raise result

    def _fail(self, candidate: CandidateVersion, reason: str) -> None:
        logger.error("student promotion failed", extra={"route": candidate.route, "version": candidate.version,
                                                        "reason": reason})
        self.registry.mark(candidate.route, candidate.version, "failed", note=reason[:500])

    async def restore_live(self) -> dict[str, str]:
        """At gateway start: load every route's live adapter (and detector) into a fresh vLLM.

        Returns route -> outcome. A route whose adapter cannot load serves from the teacher
        (its pointer is cleared) rather than failing every student request with a 404.
        """
        outcomes: dict[str, str] = {}
        for route in self.route_configs:
            live = self.registry.live(route)
            if live is None:
                continue
            async with self.route_lock(route):
                outcomes[route] = await self._restore(live)
        return outcomes

    async def _restore(self, live: CandidateVersion) -> str:
        try:
            pointer, failed = await self.load_live(live)
        except (SwapError, UpstreamFailure, OSError, ValueError, KeyError) as error:
            logger.error("live student could not be restored; serving the route from the teacher",
                         extra={"route": live.route, "version": live.version, "error": str(error)})
            self.routes.switch_student(live.route, None)
            return f"failed: {error}"
        self.routes.switch_student(live.route, pointer)
        return "loaded" if not failed else f"loaded on {len(self._members()) - failed} of {len(self._members())}"

    async def load_live(self, live: CandidateVersion) -> tuple[StudentPointer, int]:
        """Load a version that is already live (in the store) without the promotion's checks:
        on every server that takes it (one that has it already is fine), with its detector and
        learned router. A server that fails is taken out of service until the pool's recovery
        loads the live adapters into it. Returns the version's pointer and how many servers
        failed; raises when none took it. Used at start-up and by replicas following the store."""
        name = adapter_name(live.route, live.version)
        validate_adapter_dir(Path(live.adapter_path), self.max_lora_rank)
        failed = await self._load_on_members(name, live.adapter_path)
        if len(failed) == len(self._members()):
            raise failed[0][1]
        learned = await self._load_routers(live)
        take_out = getattr(self.student, "take_out", None)
        for url, failure in failed:
            logger.warning("live student not loaded on one server; it takes no traffic until it is",
                           extra={"route": live.route, "server": url, "error": str(failure)[:300]})
            if take_out is not None:
                take_out(url, f"the live adapter {name} did not load: {failure}")
        return StudentPointer(live.version, name, calibrated_threshold(live.metrics), learned), len(failed)
