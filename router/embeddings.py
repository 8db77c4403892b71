"""Sentence embeddings for the router: a bounded cache and an async micro-batcher.

``Embedder`` wraps one encoder (router/encoders.py: static, onnx or minilm). ``encode`` is
synchronous and meant for worker threads; ``embed`` is the per-request coroutine:
concurrent callers are gathered into one batched encode in a worker thread, because one
batched pass costs far less than many single ones and never blocks the event loop.
The cache holds what the encoder reads of a text (its truncation), keyed by a hash of it,
and is capped in bytes: a flood of 1 MB prompts pins a few kilobytes, not gigabytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    """Gathers concurrent ``submit`` calls and runs ``process(batch)`` once in a worker thread.

    Batching is adaptive: while a batch is being processed new requests queue up and form
    the next batch, so a lone request is never held back longer than ``max_wait_ms`` and
    under load batches grow by themselves up to ``max_batch``.
    """

    def __init__(
        self,
        process: Callable[[list[Item]], Sequence[Result]],
        *,
        max_batch: int = 64,
        max_wait_ms: float = 0.0,
        executor: ThreadPoolExecutor | None = None,
        name: str = "microbatch",
    ) -> None:
        self._process = process
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._worker: asyncio.Task[None] | None = None
        self._full: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0
        self.items = 0

    @property
    def idle(self) -> bool:
        """No batch waiting or running: a caller may do a small job itself instead."""
        return not self._pending and (self._worker is None or self._worker.done())

    async def submit(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        if self._loop is not loop:  # first use, or a new event loop (tests, restarts)
            self._loop, self._full, self._worker, self._pending = loop, asyncio.Event(), None, []
        self._pending.append((item, future))
        if len(self._pending) >= self.max_batch:
            assert self._full is not None
            self._full.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._full is not None
        while self._pending:
            # Let callers scheduled in the same loop tick join this batch before it leaves.
            await asyncio.sleep(0)
            if self.max_wait_s > 0 and len(self._pending) < self.max_batch:
                try:
                    await asyncio.wait_for(self._full.wait(), self.max_wait_s)
                except TimeoutError:
                    pass
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            self._full.clear()
            await self._run_batch(loop, batch)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[Item, Any]]) -> None:
        items = [item for item, _ in batch]
        try:
            results = await loop.run_in_executor(self._executor, self._process, items)
        except Exception as error:  # noqa: BLE001 - delivered to every caller of this batch
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        self.batches += 1
        self.items += len(items)
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class EmbeddingCache:
    """A thread-safe LRU map from a text's hash to its embedding row, capped in bytes.

    Keys are 16-byte BLAKE2b digests of the (truncated) text, never the text; each entry is
    charged its key, its row (a copy, so a cached row never pins a whole batch matrix) and
    the dictionary's per-entry overhead.
    """

    ENTRY_OVERHEAD = 120  # bytes: OrderedDict node + key object, measured with sys.getsizeof

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.bytes = 0
        self._data: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(text: str) -> bytes:
        return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def _cost(self, key: bytes, row: np.ndarray) -> int:
        return sys.getsizeof(key) + sys.getsizeof(row) + self.ENTRY_OVERHEAD

    def get(self, key: bytes) -> np.ndarray | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: bytes, value: np.ndarray) -> None:
        row = np.array(value, dtype=np.float32, copy=True)
        cost = self._cost(key, row)
        if cost > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= self._cost(key, old)
            self._data[key] = row
            self.bytes += cost
            while self.bytes > self.max_bytes:
                evicted_key, evicted = self._data.popitem(last=False)
                self.bytes -= self._cost(evicted_key, evicted)

    def __len__(self) -> int:
        return len(self._data)


class Embedder:
    """Normalised float32 embeddings from one encoder, cached and micro-batched.

    ``encoder`` is a router/encoders.py backend; without one, MiniLM under
    sentence-transformers (``model_path``, or an injected ``model`` for tests).
    """

    def __init__(
        self,
        model_path: str | None = None,
        *,
        encoder: Any | None = None,
        device: str = "cpu",
        batch_size: int = 64,
        max_batch: int = 64,
        max_wait_ms: float = 0.0,
        cache_bytes: int = 8 << 20,
        model: Any | None = None,
    ) -> None:
        from router.encoders import SentenceTransformerEncoder

        self.encoder = encoder or SentenceTransformerEncoder(model_path, device=device, batch_size=batch_size,
                                                             model=model)
        self.cache = EmbeddingCache(cache_bytes)
        self._batcher: MicroBatcher[str, np.ndarray] = MicroBatcher(
            self.encode_rows, max_batch=max_batch, max_wait_ms=max_wait_ms, name="embed"
        )

    @property
    def id(self) -> str:
        return self.encoder.id

    @property
    def dim(self) -> int:
        return int(self.encoder.dim)

    @property
    def inline(self) -> bool:
        """Cheap enough to run on the event loop for a lone request (the static encoder)."""
        return bool(getattr(self.encoder, "inline", False))

    @property
    def model(self) -> Any:
        """The sentence-transformers model (minilm encoder only)."""
        return self.encoder.model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` -> (n, dim) float32, L2-normalised. Blocking: call off the loop."""
        read = [self.encoder.truncate(text) for text in texts]
        keys = [self.cache.key(text) for text in read]
        rows = [self.cache.get(key) for key in keys]
        missing = [index for index, row in enumerate(rows) if row is None]
        fresh = self.encoder.encode([read[index] for index in missing]) if missing else None
        for position, index in enumerate(missing):
            assert fresh is not None
            rows[index] = fresh[position]
            self.cache.put(keys[index], fresh[position])
        if not rows:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.stack(rows).astype(np.float32, copy=False)

    def encode_uncached(self, texts: Sequence[str]) -> np.ndarray:
        """What new prompts cost: truncation and the encoder, no cache."""
        return self.encoder.encode([self.encoder.truncate(text) for text in texts])

    def encode_rows(self, texts: list[str]) -> list[np.ndarray]:
        return list(self.encode(texts))

    async def embed(self, text: str) -> np.ndarray:
        """One text's embedding, batched with concurrent callers; never blocks the loop."""
        return await self._batcher.submit(text)

    def close(self) -> None:
        self._batcher.close()
