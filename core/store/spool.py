"""A write-ahead spool for the request log: what bounds the rows a crash can lose.

The batched writer commits rows to SQLite a few milliseconds after the request finished;
a process killed in between (SIGKILL, OOM killer) would lose the queued rows. So each row is
first appended to a spool file as one JSON line, with a single ``write(2)``, before the
response is sent. The kernel has the line once ``write`` returns, so a process crash loses
nothing already acknowledged; with ``fsync: true`` each append is also forced to disk, which
bounds an OS crash or power loss too, at the cost of one fsync per request on the event loop;
the store then commits with ``synchronous=FULL``, so a row is durable in SQLite before the
spool lets it go (a NORMAL commit in WAL mode can be lost by power loss after the truncate).

Segments: ``<seq>.jsonl`` files in the spool directory. The writer tells the spool when a
batch is committed; a segment whose rows are all committed is deleted (the current one is
truncated) so the spool stays small whenever the writer keeps up. At start, every segment
left by a crashed run is replayed into the store (rows carry their id and are upserted, so
a row both committed and still spooled is written once) and then deleted.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SUFFIX = ".jsonl"


class Spool:
    def __init__(self, directory: Path, *, fsync: bool = False, segment_bytes: int = 16 << 20) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self._outstanding: Counter[int] = Counter()
        self._seq = max(self._segments(), default=0) + 1
        self._size = 0
        self._fd = self._open(self._seq)
        self.last_error: str | None = None
        self.append_errors = 0

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:012d}{SUFFIX}"

    def _segments(self) -> list[int]:
        return sorted(int(path.stem) for path in self.directory.glob(f"*{SUFFIX}") if path.stem.isdigit())

    def _open(self, seq: int) -> int:
        return os.open(self._path(seq), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    # -- the request path -------------------------------------------------------------------
    def append(self, row: dict[str, Any]) -> int:
        """Spool one row; returns its segment. Raises OSError (disk full...): the caller
        keeps the row in memory and goes on."""
        if self._size >= self.segment_bytes:
            self._rotate()
        line = (json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        os.write(self._fd, line)
        if self.fsync:
            os.fsync(self._fd)
        self._size += len(line)
        self._outstanding[self._seq] += 1
        self.last_error = None
        return self._seq

    def _rotate(self) -> None:
        os.close(self._fd)
        self._seq += 1
        self._fd = self._open(self._seq)
        self._size = 0

    def committed(self, segments: Iterable[int]) -> None:
        """These rows are in the store: drop segments that hold nothing uncommitted."""
        for seq in segments:
            self._outstanding[seq] -= 1
        for seq in [seq for seq, count in self._outstanding.items() if count <= 0]:
            del self._outstanding[seq]
            if seq == self._seq:
                os.ftruncate(self._fd, 0)
                self._size = 0
            else:
                self._path(seq).unlink(missing_ok=True)

    # -- start and stop ---------------------------------------------------------------------
    def recover(self, write_batch: Callable[[list[dict[str, Any]]], None], batch_size: int = 500) -> int:
        """Replay segments left by an earlier run into the store; returns the rows replayed.
        A segment is deleted only after its rows were written."""
        replayed = 0
        for seq in self._segments():
            if seq == self._seq:
                continue
            rows = list(_read_rows(self._path(seq)))
            for start in range(0, len(rows), batch_size):
                write_batch(rows[start:start + batch_size])
            self._path(seq).unlink()
            replayed += len(rows)
        if replayed:
            logger.warning("request rows recovered from the spool", extra={"rows": replayed,
                                                                           "spool": str(self.directory)})
        return replayed

    def close(self) -> None:
        """Remove the current segment when everything in it was committed."""
        os.close(self._fd)
        if not self._outstanding:
            self._path(self._seq).unlink(missing_ok=True)

    @property
    def pending(self) -> int:
        return sum(self._outstanding.values())


def _read_rows(path: Path) -> Iterable[dict[str, Any]]:
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except ValueError:  # a line torn by a full disk: nothing to recover from it
                logger.error("unreadable spool line skipped", extra={"spool": str(path), "line": number})
                continue
            if isinstance(row, dict) and "id" in row:
                yield row
