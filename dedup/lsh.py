"""Banded MinHash LSH: choosing bands and rows for recall, and a removable band index.

A signature of ``b * r`` values is cut into ``b`` bands of ``r`` rows. Two
documents of Jaccard similarity ``s`` agree on one row with probability ``s``,
on a whole band with ``s^r``, so they share at least one band (and become
candidates) with probability

    P(s) = 1 - (1 - s^r)^b                              (the S-curve)

datasketch's default choice weighs the false-positive and false-negative areas
equally; for threshold 0.8 and 128 permutations it picks 9 bands of 13 rows,
with P(0.8) ~ 0.40, so most copies at the threshold are never candidates. We
want recall, so :func:`choose_params` requires the miss
probability at the threshold, ``(1 - t^r)^b``, to be at most ``max_miss`` and
among those picks the pair with the least false-positive area
``integral_0^t P(s) ds`` (candidates below the threshold only cost an exact
Jaccard check, never a wrong answer).

:class:`BandIndex` keeps, for every band of every signature, a 64-bit key
(the band number and its ``r`` values mixed together) in one sorted array with
the row it came from; a query is one ``searchsorted`` over all its bands, and
removing rows filters both arrays, which stay sorted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_THRESHOLD = 0.8
DEFAULT_MAX_MISS = 1e-4

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_EMPTY = np.uint32(0xFFFFFFFF)


def candidate_probability(s: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """P(two documents of Jaccard ``s`` share a band) = 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - np.power(s, rows)) ** bands


@dataclass(frozen=True)
class LSHParams:
    bands: int
    rows: int

    def __post_init__(self) -> None:
        if self.bands < 1 or self.rows < 1:
            raise ValueError(f"bands and rows must be positive, got {self.bands}x{self.rows}")

    @property
    def width(self) -> int:
        return self.bands * self.rows

    def to_dict(self) -> dict:
        return {"bands": self.bands, "rows": self.rows}

    @classmethod
    def from_dict(cls, data: dict) -> LSHParams:
        return cls(int(data["bands"]), int(data["rows"]))


def choose_params(threshold: float = DEFAULT_THRESHOLD, num_perm: int = 128,
                  max_miss: float = DEFAULT_MAX_MISS) -> LSHParams:
    """The (bands, rows) with miss probability <= ``max_miss`` at ``threshold`` and least false positives."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}; 0.8 is the default")
    if not 0.0 < max_miss < 1.0:
        raise ValueError(f"max_miss must be in (0, 1), got {max_miss}; 1e-4 is the default")
    grid = np.linspace(0.0, threshold, 801)
    best: tuple[float, int, LSHParams] | None = None
    for rows in range(1, num_perm + 1):
        for bands in range(1, num_perm // rows + 1):
            if (1.0 - threshold**rows) ** bands > max_miss:
                continue
            fp_area = float(np.trapezoid(candidate_probability(grid, bands, rows), grid))
            key = (fp_area, bands * rows, LSHParams(bands, rows))
            if best is None or key[:2] < best[:2]:
                best = key
            break  # more bands only add false positives for this row count
    if best is None:
        raise ValueError(
            f"no bands x rows within {num_perm} permutations misses at most {max_miss} at Jaccard {threshold}; "
            "use more permutations, a lower threshold or a larger max_miss")
    return best[2]


def band_keys(signatures: np.ndarray, params: LSHParams) -> np.ndarray:
    """uint64 (n, bands): each band's number and values mixed into one key."""
    sig = np.asarray(signatures)
    if sig.ndim != 2 or sig.shape[1] < params.width:
        raise ValueError(f"signatures must be (n, >= {params.width}) for {params.bands}x{params.rows} bands, "
                         f"got shape {sig.shape}")
    cut = sig[:, : params.width].astype(np.uint64).reshape(len(sig), params.bands, params.rows)
    h = np.broadcast_to(np.arange(params.bands, dtype=np.uint64) * _MIX2, cut.shape[:2]).copy()
    for j in range(params.rows):
        h ^= cut[:, :, j]
        h *= _MIX1
        h ^= h >> np.uint64(31)
    h *= _MIX2
    h ^= h >> np.uint64(29)
    return h


def _non_empty(signatures: np.ndarray) -> np.ndarray:
    return ~np.all(np.asarray(signatures) == _EMPTY, axis=1)


@dataclass(frozen=True, eq=False)
class BandIndex:
    """Sorted band keys -> rows of the signatures they came from; empty signatures are left out."""

    params: LSHParams
    keys: np.ndarray  # uint64, sorted
    rows: np.ndarray  # int64, same order
    n_rows: int

    @classmethod
    def build(cls, signatures: np.ndarray, params: LSHParams) -> BandIndex:
        signatures = np.asarray(signatures)
        keys = band_keys(signatures, params)
        live = np.flatnonzero(_non_empty(signatures))
        flat_keys = keys[live].ravel()
        flat_rows = np.repeat(live.astype(np.int64), params.bands)
        order = np.argsort(flat_keys, kind="stable")
        return cls(params, flat_keys[order], flat_rows[order], len(signatures))

    def candidates(self, signatures: np.ndarray) -> list[np.ndarray]:
        """For each query signature, the sorted unique rows sharing at least one band."""
        signatures = np.atleast_2d(np.asarray(signatures))
        q = len(signatures)
        if q == 0:
            return []
        flat = band_keys(signatures, self.params).ravel()
        lo = np.searchsorted(self.keys, flat, side="left")
        hi = np.searchsorted(self.keys, flat, side="right")
        empty_q = np.repeat(~_non_empty(signatures), self.params.bands)
        hi[empty_q] = lo[empty_q]  # an empty text shares no shingle with anything
        counts = hi - lo
        total = int(counts.sum())
        if total == 0:
            return [np.empty(0, dtype=np.int64) for _ in range(q)]
        starts = np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(total)
        hits = self.rows[starts]
        owner = np.repeat(np.repeat(np.arange(q), self.params.bands), counts)
        pairs = np.unique(owner * np.int64(self.n_rows + 1) + hits)
        owner_u, rows_u = np.divmod(pairs, np.int64(self.n_rows + 1))
        bounds = np.searchsorted(owner_u, np.arange(q + 1))
        return [rows_u[bounds[i] : bounds[i + 1]] for i in range(q)]

    def without(self, remove_rows: Sequence[int] | np.ndarray) -> BandIndex:
        """The index with ``remove_rows`` dropped and the other rows renumbered 0..n'-1."""
        drop = np.zeros(self.n_rows, dtype=bool)
        drop[np.asarray(remove_rows, dtype=np.int64)] = True
        new_number = np.cumsum(~drop) - 1
        keep = ~drop[self.rows]
        return BandIndex(self.params, self.keys[keep], new_number[self.rows[keep]], int((~drop).sum()))

    def appended(self, signatures: np.ndarray) -> BandIndex:
        """The index with ``signatures`` added as rows n_rows, n_rows + 1, ..."""
        extra = BandIndex.build(signatures, self.params)
        keys = np.concatenate((self.keys, extra.keys))
        rows = np.concatenate((self.rows, extra.rows + self.n_rows))
        order = np.argsort(keys, kind="stable")
        return BandIndex(self.params, keys[order], rows[order], self.n_rows + len(signatures))
