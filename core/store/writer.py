"""The batched, asynchronous request-log writer: off the request path, never dropping.

Handlers ``await writer.log(row)``; a full queue makes them wait (back-pressure) rather
than drop a row. One task drains the queue in batches and writes each batch in a worker
thread. A batch that fails for a transient reason (locked database, disk full:
``sqlite3.OperationalError``, ``OSError``; on PostgreSQL a lost connection or no pooled one free,
``psycopg.OperationalError``) is retried with backoff until it is written or the
writer closes (then the rows are reported as unwritten in the log, loudly).

Any other failure is a *poison* row (an upstream's token count above 2^63 is SQLite's
OverflowError; a value the driver cannot bind): the batch is written row by row and each row
that still fails goes to the dead-letter file (one JSON line with the error), so one bad row
never stops the log. The task is supervised: should it die anyway, it is restarted with
backoff; ``alive``, ``restarts`` and ``dead_letter_rows`` are reported by ``/readyz`` and metrics.

With a :class:`~core.store.spool.Spool`, ``log`` first appends the row to the spool, so
rows still queued when the process dies (or when close gives up) are replayed at the next
start. A spool append that fails (disk full) is logged and counted; the row stays queued.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.store.common import TRANSIENT_ERRORS
from core.store.spool import Spool

logger = logging.getLogger(__name__)

WriteBatch = Callable[[list[dict[str, Any]]], None]
# A queued row and the spool segment holding it (None: not spooled).
Item = tuple[dict[str, Any], int | None]
RESTART_BACKOFF_S = (0.1, 0.5, 2.0, 5.0)


class DeadLetter:
    """Rows the store refused for what they hold: one JSON line each, with the error (0600)."""

    def __init__(self, path: Path | None, source: str = "requests") -> None:
        self.path = path
        self.source = source  # the table the row was meant for
        self.rows = 0

    def add(self, row: dict[str, Any], error: BaseException) -> None:
        self.rows += 1
        line = json.dumps({"at": time.time(), "table": self.source, "error": f"{type(error).__name__}: {error}",
                           "row": row},
                          default=repr, ensure_ascii=False)
        logger.error("poison row set aside in the dead-letter file",
                     extra={"row_id": row.get("id"), "error": f"{type(error).__name__}: {error}",
                            "dead_letter": str(self.path)})
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(descriptor, (line + "\n").encode(errors="replace"))
        finally:
            os.close(descriptor)


def write_isolating(write_batch: WriteBatch, rows: list[dict[str, Any]], dead_letter: DeadLetter) -> None:
    """Write ``rows``; on a non-transient failure, row by row, dead-lettering the rows that
    fail. Transient failures propagate (the caller retries the whole batch)."""
    try:
        write_batch(rows)
        return
    except TRANSIENT_ERRORS:
        raise
    except Exception as error:  # noqa: BLE001 - anything else is about the rows: isolate them
        if len(rows) == 1:
            dead_letter.add(rows[0], error)
            return
    for row in rows:
        try:
            write_batch([row])
        except TRANSIENT_ERRORS:
            raise
        except Exception as error:  # noqa: BLE001 - the row is poison: set it aside
            dead_letter.add(row, error)


class BatchWriter:
    def __init__(
        self,
        write_batch: WriteBatch,
        *,
        batch_size: int = 128,
        flush_interval_s: float = 0.05,
        queue_max: int = 10_000,
        retry_backoff_s: float = 0.2,
        name: str = "requests",
        spool: Spool | None = None,
        dead_letter_path: Path | None = None,
    ) -> None:
        self._write_batch = write_batch
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._retry_backoff_s = retry_backoff_s
        self._queue: asyncio.Queue[Item] = asyncio.Queue(maxsize=queue_max)
        self.spool = spool
        self._task: asyncio.Task[None] | None = None
        self._overflow: set[asyncio.Task[None]] = set()
        self.name = name
        self.rows_written = 0
        self.write_errors = 0
        self.last_error: str | None = None
        self.dead_letter = DeadLetter(dead_letter_path, name)
        self.restarts = 0
        self.last_crash: str | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"batch-writer-{self.name}")

    @property
    def alive(self) -> bool:
        """The writing task is running (it is restarted when it dies)."""
        return self._task is not None and not self._task.done()

    @property
    def dead_letter_rows(self) -> int:
        return self.dead_letter.rows

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    @property
    def healthy(self) -> bool:
        return self.last_error is None

    def _spooled(self, row: dict[str, Any]) -> Item:
        if self.spool is None:
            return row, None
        try:
            return row, self.spool.append(row)
        except OSError as error:
            self.spool.append_errors += 1
            self.spool.last_error = f"{type(error).__name__}: {error}"
            logger.error("spool append failed; the row is held in memory only",
                         extra={"writer": self.name, "error": self.spool.last_error})
            return row, None

    async def log(self, row: dict[str, Any]) -> None:
        await self._queue.put(self._spooled(row))

    def submit(self, row: dict[str, Any]) -> None:
        """Queue a row from a context that cannot wait (a cancelled stream's cleanup): never
        dropped; when the queue is full a task waits for room instead."""
        item = self._spooled(row)
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            task = asyncio.get_running_loop().create_task(self._queue.put(item))
            self._overflow.add(task)
            task.add_done_callback(self._overflow.discard)

    async def _next_batch(self) -> list[Item]:
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self._flush_interval_s
        while len(batch) < self._batch_size:
            timeout = deadline - asyncio.get_running_loop().time()
            if timeout <= 0 and self._queue.empty():
                break
            try:
                batch.append(self._queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self._queue.get(), timeout))
            except (asyncio.QueueEmpty, TimeoutError):
                break
        return batch

    async def _write_with_retry(self, batch: list[Item]) -> None:
        attempt = 0
        rows = [row for row, _ in batch]
        while True:
            try:
                await asyncio.to_thread(write_isolating, self._write_batch, rows, self.dead_letter)
                self.rows_written += len(batch)
                self.last_error = None
                if self.spool is not None:
                    self.spool.committed(seq for _, seq in batch if seq is not None)
                return
            except TRANSIENT_ERRORS as error:
                attempt += 1
                self.write_errors += 1
                self.last_error = f"{type(error).__name__}: {error}"
                logger.warning(
                    "store write failed; retrying",
                    extra={"writer": self.name, "rows": len(batch), "attempt": attempt, "error": self.last_error},
                )
                await asyncio.sleep(min(self._retry_backoff_s * 2 ** min(attempt, 5), 5.0))

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                await self._write_with_retry(batch)
            except Exception as error:  # the writer's outer boundary: the batch is set aside, not lost
                logger.exception("store writer failed on a batch", extra={"writer": self.name, "rows": len(batch)})
                for row, _ in batch:
                    self.dead_letter.add(row, error)
                if self.spool is not None:
                    self.spool.committed(seq for _, seq in batch if seq is not None)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _supervise(self) -> None:
        """Run the writing loop; should it die anyway, log why and start it again."""
        while True:
            try:
                await self._run()
            except Exception as error:  # the supervisor's boundary: restart rather than let requests queue forever
                self.restarts += 1
                self.last_crash = f"{type(error).__name__}: {error}"
                logger.exception("store writer died; restarting", extra={"writer": self.name,
                                                                          "restarts": self.restarts})
                await asyncio.sleep(RESTART_BACKOFF_S[min(self.restarts, len(RESTART_BACKOFF_S)) - 1])

    async def close(self, timeout_s: float = 30.0) -> None:
        """Flush every queued row, then stop."""
        if self._task is None:
            return
        if self._overflow:
            await asyncio.gather(*self._overflow)
        try:
            await asyncio.wait_for(self._queue.join(), timeout_s)
        except TimeoutError:
            logger.error("store writer closed with rows unwritten", extra={
                "writer": self.name, "rows": self.pending, "spooled_for_next_start": self.spool is not None})
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        if self.spool is not None:
            self.spool.close()
