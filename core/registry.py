"""The student version registry: rows of ``student_versions`` in the store.

A version is ``v1``, ``v2``… per route, with a status: ``candidate`` (trained, passed the
gate, not serving), ``rejected`` (failed the gate), ``live`` (serving; at most one per
route), ``retired`` (served before), ``failed`` (its load or smoke test failed at promotion).
Only the hot swap makes a version live (after vLLM loaded it), through :meth:`set_live`.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

ROLLED_BACK_NOTE = "rolled back"
_VERSION = re.compile(r"^v(\d+)$")


class VersionStore(Protocol):
    """What the registry needs from the gateway's ``Store``."""

    def upsert_version(self, row: dict[str, Any]) -> None: ...

    def versions(self, route: str) -> list[dict[str, Any]]: ...

    def live_version(self, route: str) -> dict[str, Any] | None: ...

    def set_live_version(self, route: str, version: str | None) -> None: ...


@dataclass
class CandidateVersion:
    """One trained student version as the registry records it."""

    route: str
    version: str
    status: str
    adapter_path: str
    detector_path: str | None = None
    parent: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    train_examples: int = 0
    holdout_examples: int = 0
    created_at: float = field(default_factory=time.time)
    promoted_at: float | None = None
    note: str | None = None

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["metrics_json"] = json.dumps(row.pop("metrics"), default=str)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> CandidateVersion:
        values = {key: row.get(key) for key in cls.__dataclass_fields__ if key != "metrics"}
        values["metrics"] = json.loads(row["metrics_json"]) if row.get("metrics_json") else {}
        values["train_examples"] = values["train_examples"] or 0
        values["holdout_examples"] = values["holdout_examples"] or 0
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def version_number(version: str) -> int:
    match = _VERSION.match(version)
    return int(match.group(1)) if match else 0


class Registry:
    def __init__(self, store: VersionStore) -> None:
        self._store = store

    def list(self, route: str) -> list[CandidateVersion]:
        """Every version of the route, newest first."""
        rows = [CandidateVersion.from_row(row) for row in self._store.versions(route)]
        return sorted(rows, key=lambda item: version_number(item.version), reverse=True)

    def get(self, route: str, version: str) -> CandidateVersion | None:
        return next((item for item in self.list(route) if item.version == version), None)

    def live(self, route: str) -> CandidateVersion | None:
        row = self._store.live_version(route)
        return CandidateVersion.from_row(row) if row else None

    def next_version(self, route: str) -> str:
        """The next version name, reserved in the store when it can (concurrent training runs
        in other processes then never get the same one)."""
        reserve = getattr(self._store, "reserve_version_number", None)
        if reserve is not None:
            return f"v{reserve(route)}"
        return f"v{max((version_number(item.version) for item in self.list(route)), default=0) + 1}"

    def record(self, candidate: CandidateVersion) -> CandidateVersion:
        self._store.upsert_version(candidate.to_row())
        return candidate

    def mark(self, route: str, version: str, status: str, note: str | None = None) -> None:
        row: dict[str, Any] = {"route": route, "version": version, "status": status}
        if note is not None:
            row["note"] = note
        self._store.upsert_version(row)

    def set_live(self, route: str, version: str) -> None:
        """``version`` becomes the one live version; the previous live one is retired."""
        self._store.set_live_version(route, version)

    def rollback_target(self, route: str) -> CandidateVersion | None:
        """The version that served before the live one (never one already rolled back from)."""
        live = self.live(route)
        if live is None:
            return None
        earlier = [item for item in self.list(route)
                   if item.status == "retired" and item.promoted_at is not None
                   and item.note != ROLLED_BACK_NOTE
                   and (live.promoted_at is None or item.promoted_at <= live.promoted_at)]
        return max(earlier, key=lambda item: item.promoted_at or 0.0, default=None)
