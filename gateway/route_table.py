"""Routes as they are live: config plus operator overrides plus the serving student version.

The pointer from a route to its student adapter is switched atomically (one attribute
assignment on the event loop); requests count themselves in and out per adapter so a
hot swap can wait for the old adapter to drain before vLLM unloads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.config import RouteConfig, Settings
from core.modes import Mode
from core.store import Store
from gateway.errors import InvalidRequest, RouteNotFound
from router.canary import in_canary
from router.decision import RoutePolicy

if TYPE_CHECKING:
    from gateway.canary_run import CanaryRun

logger = logging.getLogger(__name__)

BASE_MODEL_VERSION = "base"


# strict: a JSON number only (no bool, no string); allow_inf_nan=False: json.loads accepts
# NaN and Infinity, which would make every comparison with the threshold false.
ThresholdField = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class RouteOverrides(BaseModel):
    """The live-tunable settings; PATCH bodies are validated against this model.

    Every field is optional but never null: an override is cleared explicitly
    (``DELETE /admin/routes/{route}/overrides/{field}``), which restores the config's value.
    """

    model_config = ConfigDict(extra="forbid")

    ood_threshold: Annotated[ThresholdField, Field(ge=0)] = None  # type: ignore[assignment]
    # A mean token logprob: 0 is certainty, so a threshold above 0 could never be met.
    confidence_threshold: Annotated[ThresholdField, Field(le=0)] = None  # type: ignore[assignment]
    shadow_rate: Annotated[ThresholdField, Field(ge=0, le=1)] = None  # type: ignore[assignment]
    mode: Mode = None  # type: ignore[assignment]


def validate_overrides(changes: dict[str, Any]) -> dict[str, Any]:
    """The changes as stored values; raises InvalidRequest naming the first bad setting."""
    try:
        validated = RouteOverrides.model_validate(changes)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        message = "unknown setting" if first["type"] == "extra_forbidden" else first["msg"]
        raise InvalidRequest(f"{field}: {message}", param=field) from None
    return {key: (value.value if isinstance(value, Mode) else value)
            for key, value in validated.model_dump(exclude_unset=True).items()}


def usable_overrides(route: str, stored: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Split persisted overrides into those the current code accepts and those it ignores
    (written by an older version, or by hand): a bad one is reported, never a 500 per request."""
    usable, ignored = {}, {}
    for field, value in stored.items():
        try:
            usable.update(validate_overrides({field: value}))
        except InvalidRequest as error:
            ignored[field] = f"{error} (stored value {value!r})"
            logger.error("persisted route override ignored", extra={"route": route, "field": field,
                                                                     "value": value, "error": str(error)})
    return usable, ignored


@dataclass(frozen=True)
class StudentPointer:
    version: str
    adapter_name: str  # the model name vLLM serves it under
    # The version's own cascade threshold, calibrated on the holdout when it was trained.
    confidence_threshold: float | None = None
    # The version's learned router as trained (pairs, cv_auroc); None: it has none loaded.
    learned_router: dict[str, Any] | None = None


def calibrated_threshold(metrics: dict[str, Any]) -> float | None:
    """The cascade threshold a version's evaluation calibrated (None: none recorded)."""
    value = (metrics.get("candidate") or {}).get("confidence_threshold")
    return float(value) if value is not None else None


def learned_router_path(metrics: dict[str, Any]) -> str | None:
    """Where a version's training cycle saved its learned router (None: it trained none)."""
    path = (metrics.get("learned_router") or {}).get("path")
    return str(path) if path else None


def adapter_name(route: str, version: str) -> str:
    return f"{route}@{version}"


class RouteState:
    def __init__(self, config: RouteConfig, overrides: dict[str, Any]) -> None:
        self.config = config
        self.overrides, self.ignored_overrides = usable_overrides(config.name, overrides)
        self.student: StudentPointer | None = None
        # A candidate serving a share of the student traffic beside ``student`` (see
        # gateway/training/canary.py); None outside a canary rollout.
        self.canary: CanaryRun | None = None

    def setting(self, name: str) -> Any:
        return self.overrides[name] if name in self.overrides else getattr(self.config, name)

    def student_for(self, request_id: str) -> tuple[StudentPointer | None, bool]:
        """The student that answers this request, and whether it is the canary: the canary
        takes its share of the requests the router sent to the student."""
        canary = self.canary
        if canary is not None and self.student is not None and in_canary(request_id, canary.config.canary_share,
                                                                          canary.config.seed):
            return canary.pointer, True
        return self.student, False

    def confidence_threshold(self, pointer: StudentPointer | None = None) -> float | None:
        """An operator's override; else, on a calibrated route, the answering version's own
        threshold (``pointer``, default the live one); else the route's configured one."""
        if "confidence_threshold" in self.overrides:
            return float(self.overrides["confidence_threshold"])
        pointer = pointer or self.student
        calibrated = pointer.confidence_threshold if pointer else None
        if self.config.cascade.target_agreement is not None and calibrated is not None:
            return calibrated
        return self.config.confidence_threshold

    def policy(self) -> RoutePolicy:
        return RoutePolicy(
            route=self.config.name,
            mode=Mode(self.setting("mode")),
            ood_threshold=float(self.setting("ood_threshold")),
            confidence_threshold=self.confidence_threshold(),
            shadow_rate=float(self.setting("shadow_rate")),
            student_version=self.student.version if self.student else None,
            learned_min_agree=self.config.learned_router.min_agree if self.learned_router_active() else None,
        )

    def learned_router_active(self) -> bool:
        """Enabled for the route and loaded for the serving version."""
        return self.config.learned_router.enabled and bool(self.student and self.student.learned_router)

    def describe_learned_router(self) -> dict[str, Any]:
        trained = (self.student.learned_router if self.student else None) or {}
        return {"enabled": self.config.learned_router.enabled, "active": self.learned_router_active(),
                "min_agree": self.config.learned_router.min_agree,
                "pairs": trained.get("pairs"), "holdout_auroc": trained.get("cv_auroc")}

    def describe(self) -> dict[str, Any]:
        policy = self.policy()
        return {
            "name": self.config.name,
            "mode": policy.mode.value,
            "ood_threshold": policy.ood_threshold,
            "confidence_threshold": policy.confidence_threshold,
            "shadow_rate": policy.shadow_rate,
            "student_version": policy.student_version,
            "student_adapter": self.student.adapter_name if self.student else None,
            "teacher_model": self.config.teacher.model,
            "teacher_client": self.config.teacher.resolved_client(),  # httpx or litellm
            "student_base_model": self.config.student.base_model,
            "learned_router": self.describe_learned_router(),
            "overrides": dict(self.overrides),
            "ignored_overrides": dict(self.ignored_overrides),
            "canary": self.canary.describe() if self.canary is not None else None,
        }


class RouteTable:
    def __init__(self, settings: Settings, store: Store) -> None:
        self._store = store
        self._routes = {route.name: RouteState(route, store.route_overrides(route.name)) for route in settings.routes}
        self._in_flight: Counter[str] = Counter()
        self._drained = asyncio.Event()
        self._served_model_name = settings.vllm.served_model_name
        # Counts this replica's own override changes, so the replica sync never applies a
        # store read that raced one of them (see gateway/training/replica_sync.py).
        self.generation = 0
        # A live version's pointer is set once its adapter is loaded into vLLM (the training
        # loop restores it at start); until then the route serves from the teacher.
        for state in self._routes.values():
            state.student = self.initial_pointer(state.config.name)

    def initial_pointer(self, name: str) -> StudentPointer | None:
        """What a route serves with no live version: the base model if configured, else nothing."""
        if self.get(name).config.student.serve_base_model:
            return StudentPointer(BASE_MODEL_VERSION, self._served_model_name)
        return None

    def get(self, name: str) -> RouteState:
        state = self._routes.get(name)
        if state is None:
            raise RouteNotFound(f"The model `{name}` does not exist: it is not a configured route.", param="model")
        return state

    def __iter__(self) -> Iterator[RouteState]:
        return iter(self._routes.values())

    def update(self, name: str, changes: dict[str, Any], actor: str) -> RouteState:
        """Validate, persist and apply live overrides; effective for the next request."""
        state = self.get(name)
        applied = validate_overrides(changes)
        if not applied:
            raise InvalidRequest("no setting to change: send one of " + ", ".join(RouteOverrides.model_fields))
        self.generation += 1
        self._store.set_route_overrides(name, applied, actor)
        state.overrides.update(applied)
        for field in applied:
            state.ignored_overrides.pop(field, None)
        logger.info("route settings changed", extra={"route": name, "actor": actor, "changes": applied})
        return state

    def clear(self, name: str, fields: list[str], actor: str) -> RouteState:
        """Drop overrides (persisted and live): the config's values apply again."""
        state = self.get(name)
        unknown = [field for field in fields
                   if field not in RouteOverrides.model_fields and field not in state.ignored_overrides]
        if unknown:
            raise InvalidRequest(f"{unknown[0]}: unknown setting", param=unknown[0])
        self.generation += 1
        self._store.clear_route_overrides(name, fields, actor)
        for field in fields:
            state.overrides.pop(field, None)
            state.ignored_overrides.pop(field, None)
        logger.info("route overrides cleared", extra={"route": name, "actor": actor, "fields": fields})
        return state

    # -- student pointer and drain (used by the hot swap) ------------------------------------
    def switch_student(self, name: str, pointer: StudentPointer | None) -> StudentPointer | None:
        state = self.get(name)
        previous, state.student = state.student, pointer
        logger.info("student switched", extra={"route": name, "from": previous, "to": pointer})
        return previous

    @contextlib.contextmanager
    def track(self, adapter: str) -> Iterator[None]:
        self._in_flight[adapter] += 1
        try:
            yield
        finally:
            self._in_flight[adapter] -= 1
            if self._in_flight[adapter] <= 0:
                del self._in_flight[adapter]
                self._drained.set()

    def in_flight(self, adapter: str) -> int:
        return self._in_flight.get(adapter, 0)

    async def wait_drained(self, adapter: str, timeout_s: float = 30.0) -> bool:
        """Wait until no request that chose ``adapter`` is still running."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.in_flight(adapter) > 0:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), remaining)
        return True
