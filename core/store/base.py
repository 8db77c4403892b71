"""The ``Store`` seam: what the gateway, router and trainer need from persistence.

SQLite (via sqlite-utils) is the embedded default; a server database (PostgreSQL) for
several gateway replicas implements the same protocol.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol


class Store(Protocol):
    def insert_requests(self, rows: list[dict[str, Any]]) -> None: ...

    def insert_shadow_results(self, rows: list[dict[str, Any]]) -> None: ...

    def count_requests(self, route: str | None = None) -> int: ...

    def iter_requests(
        self, route: str, *, target: str | None = None, after: float = 0.0, ok_only: bool = True
    ) -> Iterator[dict[str, Any]]: ...

    def iter_shadow_results(self, route: str, *, after: float = 0.0) -> Iterator[dict[str, Any]]: ...

    def route_overrides(self, route: str) -> dict[str, Any]: ...

    def set_route_overrides(self, route: str, changes: dict[str, Any], actor: str) -> None: ...

    def record_route_event(self, route: str, actor: str, action: str, old: Any, new: Any) -> None: ...

    def route_audit(self, route: str) -> list[dict[str, Any]]: ...

    def upsert_version(self, row: dict[str, Any]) -> None: ...

    def versions(self, route: str) -> list[dict[str, Any]]: ...

    def live_version(self, route: str) -> dict[str, Any] | None: ...

    def set_live_version(self, route: str, version: str | None) -> None: ...

    def record_training_run(self, row: dict[str, Any]) -> int: ...

    def training_runs(self, route: str) -> list[dict[str, Any]]: ...

    def check_writable(self) -> None: ...

    def close(self) -> None: ...


def chunked(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
