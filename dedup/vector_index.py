"""A FAISS inner-product index over unit vectors, with removable int64 ids.

For unit vectors ``cos(x, y) = <x, y>``, so an inner-product index answers cosine
queries, and ``range_search(q, t)`` returns every stored vector with
``<q, x> > t``: "everything above the threshold", not a fixed top-k.

Two layouts, both able to remove ids (HNSW cannot, so it is not offered):

* ``flat``: ``IndexIDMap2(IndexFlatIP)``; exact; every query reads every vector
  (``n * d * 4`` bytes), right for small shards.
* ``ivf``: ``IndexIVFFlat`` with ``nlist ~ sqrt(n)`` k-means cells and a
  hash-table direct map (ids -> list positions, for removal and
  reconstruction); a query reads the ``nprobe`` nearest cells only, so about
  ``nprobe / nlist`` of the vectors. Near-duplicates lie close together and
  almost always share a probed cell; the benchmark measures what is missed
  against the exact answer.

A search of fewer than 64 queries runs on one OpenMP thread: on two busy cores
a thread team costs tens of milliseconds, the search itself about one.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

_KINDS = ("auto", "flat", "ivf")
_SERIAL_QUERIES = 64


@contextmanager
def _omp_threads(n: int):
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


@dataclass(frozen=True)
class VectorIndexParams:
    kind: str = "auto"
    ivf_min_rows: int = 10_000  # "auto" switches from flat to ivf at this many vectors
    nlist: int | None = None  # None: sqrt(n), clipped to 16..4096
    nprobe: int = 8  # 1M demo records in 8 shards: recall 1.0 at nprobe 8, 0.9986 at 4 (bench_locate)
    train_size: int = 64  # training vectors per cell
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"vector index kind must be one of {', '.join(_KINDS)}, got {self.kind!r}")
        if self.nprobe < 1 or self.ivf_min_rows < 1 or self.train_size < 39:
            raise ValueError("need nprobe >= 1, ivf_min_rows >= 1 and train_size >= 39 (FAISS's minimum per cell)")

    def resolve(self, n: int) -> str:
        if self.kind != "auto":
            return self.kind
        return "ivf" if n >= self.ivf_min_rows else "flat"

    def cells(self, n: int) -> int:
        return self.nlist or int(min(4096, max(16, round(math.sqrt(n)))))


def _check_vectors(vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise ValueError(f"vectors must be a 2-D float32 array{f' with {dim} columns' if dim else ''}, "
                         f"got shape {x.shape}")
    return x


class VectorIndex:
    """Owns one FAISS index; methods that change it return a new VectorIndex."""

    def __init__(self, index: faiss.Index, kind: str) -> None:
        self._index = index
        self.kind = kind

    @property
    def dim(self) -> int:
        return self._index.d

    @property
    def ntotal(self) -> int:
        return self._index.ntotal

    @property
    def nprobe(self) -> int | None:
        return faiss.extract_index_ivf(self._index).nprobe if self.kind == "ivf" else None

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, params: VectorIndexParams = VectorIndexParams()) -> VectorIndex:
        x = _check_vectors(vectors)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) != len(x):
            raise ValueError(f"{len(x)} vectors but {len(ids)} ids")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids must be unique")
        n, d = x.shape
        kind = params.resolve(n)
        if kind == "flat" or n == 0:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
            kind = "flat"
        else:
            nlist = min(params.cells(n), max(1, n // 39))
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(params.seed)
            sample = x[rng.choice(n, min(n, nlist * params.train_size), replace=False)] if n > nlist * params.train_size else x
            index.cp.seed = params.seed
            index.train(sample)
            index.set_direct_map_type(faiss.DirectMap.Hashtable)
            index.nprobe = min(params.nprobe, nlist)
        if n:
            index.add_with_ids(x, ids)
        return cls(index, kind)

    def range_search(self, queries: np.ndarray, min_similarity: float,
                     nprobe: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each query, (ids, similarities) of the vectors with similarity >= ``min_similarity``, best first.

        ``nprobe`` overrides, for this call, how many IVF cells are read (ignored by ``flat``).
        """
        q = _check_vectors(np.atleast_2d(queries), self.dim)
        if len(q) == 0:
            return []
        if self.ntotal == 0:
            return [(np.empty(0, np.int64), np.empty(0, np.float32)) for _ in range(len(q))]
        # FAISS keeps inner products strictly above the radius; step just below it.
        radius = float(np.nextafter(np.float32(min_similarity), np.float32(-np.inf)))
        params = faiss.SearchParametersIVF(nprobe=nprobe) if nprobe and self.kind == "ivf" else None
        with _omp_threads(1) if len(q) < _SERIAL_QUERIES else nullcontext():
            lims, sims, ids = self._index.range_search(q, radius, params=params)
        out = []
        for i in range(len(q)):
            s, d = sims[lims[i] : lims[i + 1]], ids[lims[i] : lims[i + 1]]
            keep = s >= min_similarity
            s, d = s[keep], d[keep]
            order = np.argsort(-s, kind="stable")
            out.append((d[order], s[order]))
        return out

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar stored vectors of each query: (ids, similarities), each (len(q), k),
        best first; where fewer than ``k`` are found the row is padded with id -1 and similarity NaN."""
        q = _check_vectors(np.atleast_2d(queries), self.dim)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if len(q) == 0 or self.ntotal == 0:
            return np.full((len(q), k), -1, np.int64), np.full((len(q), k), np.nan, np.float32)
        params = faiss.SearchParametersIVF(nprobe=nprobe) if nprobe and self.kind == "ivf" else None
        with _omp_threads(1) if len(q) < _SERIAL_QUERIES else nullcontext():
            sims, ids = self._index.search(q, k, params=params)
        sims = np.where(ids < 0, np.nan, sims).astype(np.float32)
        return ids.astype(np.int64), sims

    def without(self, ids: Sequence[int] | np.ndarray) -> VectorIndex:
        """A copy with ``ids`` removed (unknown ids are ignored)."""
        index = faiss.clone_index(self._index)
        if self.kind == "ivf":
            faiss.extract_index_ivf(index).set_direct_map_type(faiss.DirectMap.Hashtable)
            faiss.extract_index_ivf(index).nprobe = self.nprobe
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids):
            index.remove_ids(faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids)))
        return VectorIndex(index, self.kind)

    def reconstruct(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` (KeyError-like RuntimeError from FAISS if one is absent)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        return np.stack([self._index.reconstruct(int(i)) for i in ids]) if len(ids) else np.zeros((0, self.dim), np.float32)

    def save(self, path: str | Path) -> None:
        """Write atomically: a temporary file next to ``path``, then os.replace."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            faiss.write_index(self._index, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path, kind: str, nprobe: int | None = None) -> VectorIndex:
        index = faiss.read_index(str(path))
        if kind == "ivf":
            ivf = faiss.extract_index_ivf(index)
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
            if nprobe:
                ivf.nprobe = nprobe
        return cls(index, kind)
