"""One shard version's locate indexes: built at ingest, saved beside the shard file, never changed.

For the shard version file ``P`` (e.g. ``.../shard-003/v0002.parquet``) the
artefacts live in the directory ``P.dedup/``:

* ``manifest.json``: shard, version, row count, MinHash/LSH parameters, the
  embedder spec and vector index layout, and the size of every file below;
* ``records.parquet``: row -> record_id, slice, vector id (FAISS id);
* ``signatures.npy``: uint32 (n, num_perm) MinHash signatures (the service builds
  them under the dataset's keyed parameters; the manifest holds only the key's
  fingerprint, and :meth:`ShardIndex.load` takes the key back with ``minhash=``);
* ``band_keys.npy``, ``band_rows.npy``: the sorted LSH band table;
* ``vectors.faiss``: the embeddings in a FAISS index (absent without an embedder);
* ``knn_mean.npy``: float32 (n,) mean cosine of each record's k nearest other
  records in this shard version (k in the manifest), the candidate side of the
  paraphrase margin (:mod:`dedup.paraphrase`), computed once here so that a query
  needs only its own neighbours. An index written before it has none: its
  margins use the query's side alone.

The directory is written under a temporary name, every file fsynced, and then
renamed into place, so ``P.dedup/`` either holds a complete index or does not
exist. Removing records yields a new ShardIndex for the next shard version
(rows renumbered, FAISS ids kept) plus the removed records' signatures, which
are the only thing the tombstones keep.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedup.embeddings import Embedder, check_embedder, embedder_spec
from dedup.lsh import DEFAULT_THRESHOLD, BandIndex, LSHParams, choose_params
from dedup.minhash import MinHashKeyMismatch, MinHashParams, minhash_signatures
from dedup.paraphrase import DEFAULT_K, knn_means
from dedup.vector_index import VectorIndex, VectorIndexParams

FORMAT_VERSION = 1
ARTEFACT_SUFFIX = ".dedup"
_MANIFEST = "manifest.json"


def artefact_dir(shard_version_path: str | Path) -> Path:
    """Where the indexes of the shard version file ``shard_version_path`` live."""
    return Path(str(shard_version_path) + ARTEFACT_SUFFIX)


@dataclass(frozen=True)
class RemovedRecords:
    """What a shard version dropped: the record ids and their signatures (no text)."""

    shard: int
    version: int
    record_ids: tuple[str, ...]
    signatures: np.ndarray  # uint32 (len(record_ids), num_perm)
    minhash: MinHashParams


@dataclass(frozen=True, eq=False)
class ShardIndex:
    shard: int
    version: int
    record_ids: np.ndarray  # object array of str, row order
    slices: np.ndarray  # int32
    vector_ids: np.ndarray  # int64, strictly increasing
    next_vector_id: int
    signatures: np.ndarray  # uint32 (n, num_perm)
    minhash: MinHashParams
    bands: BandIndex
    embedder: dict | None
    vectors: VectorIndex | None
    knn_mean: np.ndarray | None = None  # float32 (n,), see the module doc
    knn_k: int = DEFAULT_K

    @property
    def n(self) -> int:
        return len(self.record_ids)

    @functools.cached_property
    def _row_of(self) -> dict[str, int]:
        return {rid: i for i, rid in enumerate(self.record_ids.tolist())}

    def row(self, record_id: str) -> int | None:
        """The row of ``record_id``, or None if this shard version does not hold it."""
        return self._row_of.get(record_id)

    def minhash_candidates(self, signatures: np.ndarray) -> list[np.ndarray]:
        """For each query signature, the rows that share an LSH band with it."""
        return self.bands.candidates(signatures)

    def embedding_neighbours(self, vectors: np.ndarray, min_similarity: float, embedder: Embedder,
                             nprobe: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each query vector, (rows, cosines) of the records at ``min_similarity`` or above."""
        if self.vectors is None or self.embedder is None:
            return [(np.empty(0, np.int64), np.empty(0, np.float32)) for _ in range(len(vectors))]
        check_embedder(embedder, self.embedder)
        found = self.vectors.range_search(vectors, min_similarity, nprobe)
        return [(np.searchsorted(self.vector_ids, ids), sims) for ids, sims in found]

    def nearest(self, vectors: np.ndarray, k: int, embedder: Embedder,
                nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest records of each query vector: (rows, cosines), each (len(vectors), k),
        best first, padded with row -1 and cosine NaN where the shard has fewer."""
        if self.vectors is None or self.embedder is None:
            return np.full((len(vectors), k), -1, np.int64), np.full((len(vectors), k), np.nan, np.float32)
        check_embedder(embedder, self.embedder)
        ids, sims = self.vectors.search(vectors, k, nprobe)
        rows = np.where(ids >= 0, np.searchsorted(self.vector_ids, np.maximum(ids, 0)), -1)
        return rows, sims

    def without(self, record_ids: Sequence[str], new_version: int) -> tuple[ShardIndex, RemovedRecords]:
        """The index of the next shard version, which no longer holds ``record_ids``."""
        if new_version <= self.version:
            raise ValueError(f"the new version must be above {self.version}, got {new_version}")
        missing = [r for r in record_ids if r not in self._row_of]
        if missing:
            raise ValueError(f"{len(missing)} record ids are not in shard {self.shard} version {self.version} "
                             f"(first: {missing[0]!r}); remove only ids this version holds")
        rows = np.unique(np.fromiter((self._row_of[r] for r in record_ids), dtype=np.int64, count=len(record_ids)))
        keep = np.ones(self.n, dtype=bool)
        keep[rows] = False
        removed = RemovedRecords(self.shard, self.version, tuple(self.record_ids[rows].tolist()),
                                 np.array(self.signatures[rows]), self.minhash)
        vectors = self.vectors.without(self.vector_ids[rows]) if self.vectors is not None else None
        # The kept records' neighbourhood means stay as built: a removed neighbour still counts,
        # which can only lower a margin (the conservative side for review).
        knn_mean = self.knn_mean[keep] if self.knn_mean is not None else None
        index = ShardIndex(self.shard, new_version, self.record_ids[keep], self.slices[keep],
                           self.vector_ids[keep], self.next_vector_id, np.ascontiguousarray(self.signatures[keep]),
                           self.minhash, self.bands.without(rows), self.embedder, vectors, knn_mean, self.knn_k)
        return index, removed

    # ------------------------------------------------------------------ files
    def save(self, shard_version_path: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``<shard_version_path>.dedup/`` atomically; returns that directory."""
        final = artefact_dir(shard_version_path)
        if final.exists() and not overwrite:
            raise FileExistsError(f"{final} exists; shard versions are immutable: save the index of a new "
                                  "version, or pass overwrite=True to replace a rebuilt one")
        final.parent.mkdir(parents=True, exist_ok=True)
        # The writer's PID in the temporary names lets a sweep tell a killed writer's leftovers (shards.files).
        tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-{os.getpid()}.", dir=final.parent))
        try:
            files = {}
            files["records.parquet"] = _write(tmp / "records.parquet", lambda f: pq.write_table(pa.table({
                "record_id": pa.array(self.record_ids.tolist(), pa.string()),
                "slice": pa.array(self.slices, pa.int32()),
                "vector_id": pa.array(self.vector_ids, pa.int64())}), f))
            files["signatures.npy"] = _write(tmp / "signatures.npy", lambda f: np.save(f, self.signatures))
            files["band_keys.npy"] = _write(tmp / "band_keys.npy", lambda f: np.save(f, self.bands.keys))
            files["band_rows.npy"] = _write(tmp / "band_rows.npy", lambda f: np.save(f, self.bands.rows))
            vector_meta = None
            if self.vectors is not None:
                self.vectors.save(tmp / "vectors.faiss")
                files["vectors.faiss"] = (tmp / "vectors.faiss").stat().st_size
                vector_meta = {"kind": self.vectors.kind, "nprobe": self.vectors.nprobe, "dim": self.vectors.dim}
            if self.knn_mean is not None:
                files["knn_mean.npy"] = _write(tmp / "knn_mean.npy", lambda f: np.save(f, self.knn_mean))
                vector_meta = {**(vector_meta or {}), "knn_k": self.knn_k}
            manifest = {
                "format": FORMAT_VERSION, "shard": self.shard, "version": self.version, "rows": self.n,
                "next_vector_id": self.next_vector_id, "minhash": self.minhash.to_dict(),
                "lsh": self.bands.params.to_dict(), "embedder": self.embedder, "vector_index": vector_meta,
                "files": files,
            }
            _write(tmp / _MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2, sort_keys=True).encode()))
            _fsync_dir(tmp)
            if final.exists():  # overwrite=True: move the old one aside first
                trash = Path(tempfile.mkdtemp(prefix=f"{final.name}.old-{os.getpid()}.", dir=final.parent))
                os.replace(final, trash / "old")
                os.replace(tmp, final)
                shutil.rmtree(trash)  # the old index names erased records too: a failure must be seen
            else:
                os.replace(tmp, final)
            _fsync_dir(final.parent)
        except BaseException as exc:
            try:
                shutil.rmtree(tmp)
            except FileNotFoundError:
                pass
            except OSError as cleanup:  # keep the original error; say what is left for the sweep
                exc.add_note(f"the temporary index {tmp} could not be removed ({cleanup}); `erasure gc` removes it")
            raise
        return final

    @classmethod
    def load(cls, shard_version_path: str | Path, *, mmap: bool = False,
             minhash: MinHashParams | None = None) -> ShardIndex:
        """Read ``<shard_version_path>.dedup/``; ``mmap`` maps the signatures instead of reading them.

        ``minhash``: the parameters (with their key, if keyed) the caller queries
        with; :class:`~dedup.minhash.MinHashKeyMismatch` if the index was built
        under others (rebuild it). Without it, keyed parameters come back without
        their key (stored signatures usable, new ones not computable)."""
        base = artefact_dir(shard_version_path)
        try:
            manifest = json.loads((base / _MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"no locate index at {base}: build it with build_shard_index(...).save(...)") from None
        if manifest.get("format") != FORMAT_VERSION:
            raise ValueError(f"{base} has index format {manifest.get('format')}, this version reads "
                             f"{FORMAT_VERSION}: rebuild the index")
        stored = MinHashParams.from_dict(manifest["minhash"])
        if minhash is not None and stored != minhash:
            raise MinHashKeyMismatch(f"{base} was built under MinHash parameters {stored} (key id {stored.key_id}), "
                                     f"not {minhash}: rebuild the index")
        for name, size in manifest["files"].items():
            actual = (base / name).stat().st_size
            if actual != size:
                raise ValueError(f"{base / name} has {actual} bytes, the manifest says {size}: rebuild the index")
        table = pq.read_table(base / "records.parquet")
        record_ids = np.array(table.column("record_id").to_pylist(), dtype=object)
        slices = table.column("slice").to_numpy().astype(np.int32)
        vector_ids = table.column("vector_id").to_numpy().astype(np.int64)
        signatures = np.load(base / "signatures.npy", mmap_mode="r" if mmap else None)
        lsh = LSHParams.from_dict(manifest["lsh"])
        bands = BandIndex(lsh, np.load(base / "band_keys.npy"), np.load(base / "band_rows.npy"), len(record_ids))
        vectors, knn_mean, knn_k = None, None, DEFAULT_K
        if manifest["vector_index"] is not None:
            meta = manifest["vector_index"]
            vectors = VectorIndex.load(base / "vectors.faiss", meta["kind"], meta["nprobe"])
            if "knn_mean.npy" in manifest["files"]:
                knn_mean, knn_k = np.load(base / "knn_mean.npy"), int(meta["knn_k"])
                if len(knn_mean) != len(record_ids):
                    raise ValueError(f"{base}: knn_mean.npy and the records disagree in length; rebuild the index")
        if len(signatures) != len(record_ids) or (vectors is not None and vectors.ntotal != len(record_ids)):
            raise ValueError(f"{base}: the signatures, vectors and records disagree in length; rebuild the index")
        return cls(int(manifest["shard"]), int(manifest["version"]), record_ids, slices, vector_ids,
                   int(manifest["next_vector_id"]), signatures, minhash if minhash is not None else stored,
                   bands, manifest["embedder"], vectors, knn_mean, knn_k)


def build_shard_index(
    shard: int,
    version: int,
    record_ids: Sequence[str],
    texts: Sequence[str],
    slices: Sequence[int] | np.ndarray,
    *,
    embedder: Embedder | None = None,
    minhash: MinHashParams = MinHashParams(),
    lsh: LSHParams | None = None,
    vector_params: VectorIndexParams = VectorIndexParams(),
    vectors: np.ndarray | None = None,
    workers: int = 1,
    knn_k: int = DEFAULT_K,
) -> ShardIndex:
    """Signatures, LSH bands and (with an embedder) the FAISS index of one shard version's records.

    ``vectors`` may hold the texts' embeddings by ``embedder`` computed already
    (e.g. by a pool of worker processes); ``workers`` threads share the signatures.
    """
    n = len(record_ids)
    if len(texts) != n or len(slices) != n:
        raise ValueError(f"record_ids, texts and slices must be equally long, got {n}, {len(texts)}, {len(slices)}")
    ids = np.array(list(record_ids), dtype=object)
    if n and (not all(isinstance(r, str) and r for r in ids) or len(set(ids.tolist())) != n):
        raise ValueError("record ids must be unique non-empty strings")
    lsh = lsh or choose_params(DEFAULT_THRESHOLD, minhash.num_perm)
    if lsh.width > minhash.num_perm:
        raise ValueError(f"{lsh.bands}x{lsh.rows} bands need {lsh.width} permutations, the signatures have "
                         f"{minhash.num_perm}")
    signatures = minhash_signatures(texts, minhash, workers=workers)
    vector_ids = np.arange(n, dtype=np.int64)
    index, knn_mean = None, None
    if embedder is not None:
        if vectors is None:
            vectors = embedder.embed(texts)
        if vectors.shape != (n, embedder.dim):
            raise ValueError(f"vectors must be ({n}, {embedder.dim}) for embedder {embedder.name!r}, "
                             f"got {vectors.shape}")
        index = VectorIndex.build(vectors, vector_ids, vector_params)
        knn_mean = record_knn_means(index, vectors, vector_ids, knn_k)
    elif vectors is not None:
        raise ValueError("vectors were given without the embedder that made them; pass embedder= too")
    return ShardIndex(int(shard), int(version), ids, np.asarray(slices, dtype=np.int32), vector_ids, n,
                      signatures, minhash, BandIndex.build(signatures, lsh),
                      embedder_spec(embedder) if embedder is not None else None, index, knn_mean, knn_k)


def record_knn_means(index: VectorIndex, vectors: np.ndarray, vector_ids: np.ndarray, k: int,
                     batch: int = 4096) -> np.ndarray:
    """Each record's mean cosine to its ``k`` nearest other records (itself left out; NaN if alone)."""
    out = np.empty(len(vectors), dtype=np.float32)
    for start in range(0, len(vectors), batch):
        stop = min(start + batch, len(vectors))
        ids, sims = index.search(vectors[start:stop], k + 1)
        sims = np.where(ids == vector_ids[start:stop, None], np.nan, sims)  # itself (ties: wherever it sits)
        best = -np.sort(-sims, axis=1)[:, :k]  # NaNs sort last
        out[start:stop] = knn_means(best)
    return out


def texts_from_parquet(paths: Mapping[int, str | Path],
                       row_of: Callable[[int, str], int | None] | None = None,
                       metadata_of: Callable[[int], pq.FileMetaData] | None = None,
                       ) -> Callable[[int, Sequence[str]], list[str]]:
    """A ``fetch_texts(shard, record_ids)`` over shard Parquet files (columns record_id, text).

    With ``row_of(shard, record_id)`` (the row a shard index holds the record at: the file's row,
    since indexes are built from and shrunk with their file) only the row groups holding the asked
    rows are read: a request needs tens of texts, and a whole text column of a 125k-row shard costs
    ~200 ms to decode against ~0.2 ms per 256-row group (``shards.store.ROW_GROUP_ROWS``). The ids
    read back are the check: a record not found where its row says (or without a row) makes the
    whole file be read, as without ``row_of``. Texts read are kept for the fetcher's life (one locate).
    ``metadata_of(shard)``: the file's footer, parsed once by the caller's cache (parsing a 125k-row
    shard's ~120 row-group descriptions cost each request about 0.5 ms per shard it read from).
    """
    texts: dict[int, dict[str, str]] = {}
    whole: set[int] = set()

    def keep(shard: int, table) -> None:  # noqa: ANN001 - a pyarrow Table
        texts.setdefault(shard, {}).update(zip(table.column("record_id").to_pylist(),
                                               table.column("text").to_pylist()))

    def fetch(shard: int, record_ids: Sequence[str]) -> list[str]:
        missing = [r for r in record_ids if r not in texts.get(shard, {})]
        if missing and shard not in whole:
            if shard not in paths:
                raise KeyError(f"no shard file for shard {shard}")
            rows = [row_of(shard, r) for r in missing] if row_of is not None else [None]
            if all(r is not None for r in rows):
                file = pq.ParquetFile(paths[shard], metadata=metadata_of(shard) if metadata_of else None)
                sizes = [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)]
                starts = np.cumsum([0] + sizes)
                group_of = {r: int(np.searchsorted(starts, r, side="right")) - 1 for r in rows}
                groups = sorted({g for g in group_of.values() if 0 <= g < len(sizes)})
                # one thread: a few row groups decode in ~1 ms; Arrow's pool took 4x that
                # (more on a loaded machine) to hand them out and join
                table = file.read_row_groups(groups, columns=["record_id", "text"], use_threads=False)
                # only the asked rows become Python strings (half the cost was converting whole groups)
                offset = dict(zip(groups, np.cumsum([0] + [sizes[g] for g in groups]).tolist()))
                keep(shard, table.take([offset[group_of[r]] + r - int(starts[group_of[r]])
                                        for r in rows if group_of[r] in offset]))
            if any(r not in texts.get(shard, {}) for r in missing):
                keep(shard, pq.read_table(paths[shard], columns=["record_id", "text"]))
                whole.add(shard)
        known = texts.get(shard, {})
        return [known[r] for r in record_ids]

    return fetch


def _write(path: Path, writer: Callable) -> int:
    with open(path, "wb") as f:
        writer(f)
        f.flush()
        os.fsync(f.fileno())
    return path.stat().st_size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
