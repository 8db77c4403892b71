"""Building the router's embedders from the packaged MiniLM, offline, once (``init-router``).

- ``static``: model2vec distils a static model from the local MiniLM directory (a forward
  pass per vocabulary token, PCA to 256 dimensions, SIF weighting); about 20 s on two idle
  cores, 8.5 minutes at load 9 here (peak RSS 1 GB).
- ``onnx``: ``torch.onnx.export`` of MiniLM, then onnxruntime's dynamic int8 quantisation.

torch is needed to *build* either, never to serve them. Each artefact is written to a
temporary directory and renamed into place, so a crash never leaves a half-built one that a
later start would take for finished. ``ensure_embedder`` builds what the config names when it
is missing; ``create_embedder`` is what the gateway, the trainer and eval-ood serve with.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from router.embeddings import Embedder
from router.encoders import OnnxEncoder, StaticEncoder, default_model_path

logger = logging.getLogger(__name__)

EMBEDDERS = ("minilm", "static", "onnx")
STATIC_PCA_DIMS = 256
_MARKER = "built.ok"  # written last: its presence means the artefact is whole


def artifact_dir(artifacts_dir: str | Path, kind: str) -> Path:
    return Path(artifacts_dir) / kind


def is_built(artifacts_dir: str | Path, kind: str) -> bool:
    return kind == "minilm" or (artifact_dir(artifacts_dir, kind) / _MARKER).exists()


def _build_static(out: Path, source: str) -> None:
    from model2vec.distill import distill

    model = distill(source, pca_dims=STATIC_PCA_DIMS, device="cpu")
    model.save_pretrained(str(out))


class _LastHiddenState:
    """MiniLM with keyword inputs and one output, the shape ``torch.onnx.export`` wants."""

    def __new__(cls, model: Any) -> Any:
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
                return self.model(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state

        return Wrapper().eval()


def _build_onnx(out: Path, source: str) -> None:
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel

    model = _LastHiddenState(AutoModel.from_pretrained(source))
    sample = torch.ones(1, 8, dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    fp32 = out / "model.fp32.onnx"
    # The TorchScript exporter on purpose (the torch.export one needs onnxscript, one dependency
    # more for the same model); torch warns that it is deprecated at every call, and tracing
    # warns about the Python branches it freezes (none depend on the input here).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (sample, sample, torch.zeros_like(sample)), str(fp32), input_names=names,
                          output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                          dynamic_axes={name: {0: "batch", 1: "tokens"} for name in [*names, "last_hidden_state"]})
    quantize_dynamic(str(fp32), str(out / "model.onnx"), weight_type=QuantType.QInt8)
    fp32.unlink()
    shutil.copy(Path(source) / "tokenizer.json", out / "tokenizer.json")


def build_embedder(kind: str, artifacts_dir: str | Path, source: str | None = None) -> Path | None:
    """Build ``kind`` under ``artifacts_dir/kind`` from the local MiniLM; returns its directory."""
    if kind not in EMBEDDERS:
        raise ValueError(f"unknown embedder {kind!r}; known: {', '.join(EMBEDDERS)}")
    if kind == "minilm":
        return None  # the packaged model is used as it is
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    source = source or default_model_path()
    final = artifact_dir(artifacts_dir, kind)
    staging = final.with_name(f"{final.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.perf_counter()
    try:
        (_build_static if kind == "static" else _build_onnx)(staging, source)
        (staging / _MARKER).write_text(f"built from {source}\n")
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("router embedder built", extra={"kind": kind, "dir": str(final),
                                                "build_s": round(time.perf_counter() - started, 1)})
    return final


def ensure_embedder(kind: str, artifacts_dir: str | Path) -> Path | None:
    """The built artefact for ``kind``, building it first when it is missing."""
    if is_built(artifacts_dir, kind):
        return None if kind == "minilm" else artifact_dir(artifacts_dir, kind)
    return build_embedder(kind, artifacts_dir)


def create_encoder(kind: str, artifacts_dir: str | Path) -> Any:
    """A ready encoder of ``kind``; raises FileNotFoundError naming the init step when unbuilt."""
    if kind == "minilm":
        from router.encoders import SentenceTransformerEncoder

        return SentenceTransformerEncoder()
    if not is_built(artifacts_dir, kind):
        raise FileNotFoundError(f"router embedder {kind!r} is not built in {artifact_dir(artifacts_dir, kind)}: "
                                f"run `distillgate init-router --config <file>`")
    path = artifact_dir(artifacts_dir, kind)
    return StaticEncoder(path) if kind == "static" else OnnxEncoder(path)


class LazyEncoder:
    """An encoder made on first use: a gateway with no detector never loads (or builds) one."""

    def __init__(self, kind: str, artifacts_dir: str | Path, build: bool) -> None:
        self.kind, self.artifacts_dir, self.build = kind, Path(artifacts_dir), build
        self._encoder: Any | None = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        if self._encoder is None:
            with self._lock:
                if self._encoder is None:
                    if self.build:
                        ensure_embedder(self.kind, self.artifacts_dir)
                    self._encoder = create_encoder(self.kind, self.artifacts_dir)
        return self._encoder

    @property
    def id(self) -> str:
        return str(self.get().id)

    @property
    def dim(self) -> int:
        return int(self.get().dim)

    @property
    def model(self) -> Any:
        return self.get().model

    @property
    def inline(self) -> bool:
        return bool(getattr(self.get(), "inline", False))

    def truncate(self, text: str) -> str:
        return str(self.get().truncate(text))

    def encode(self, texts: Any) -> Any:
        return self.get().encode(texts)


def create_embedder(config: Any, *, build: bool = False, lazy: bool = False, **kwargs: Any) -> Embedder:
    """The embedder a ``RouterConfig`` names (``build``: build it first when missing).

    ``lazy``: load (and build) on first use rather than now.
    """
    kwargs.setdefault("cache_bytes", int(config.cache_mb * (1 << 20)))
    if lazy:
        return Embedder(encoder=LazyEncoder(config.embedder, config.artifacts_dir, build), **kwargs)
    if build:
        ensure_embedder(config.embedder, config.artifacts_dir)
    return Embedder(encoder=create_encoder(config.embedder, config.artifacts_dir), **kwargs)
