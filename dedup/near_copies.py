"""Verified near-copies of some texts among others: the copy edges of subject placement.

MinHash LSH proposes candidates (:func:`dedup.lsh.choose_params` for the
threshold: misses a pair at the threshold with probability <= 1e-4), and each
candidate is kept only if its *exact* Jaccard on word shingles is at least the
threshold (``dedup.policy.Thresholds.jaccard_erase``, 0.8 by default): the same
evidence that erases a copy with its original also places it with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dedup.lsh import BandIndex, choose_params
from dedup.minhash import MinHashParams, minhash_signatures
from dedup.normalize import exact_jaccard, shingle_set
from dedup.shard_index import ShardIndex


@dataclass(frozen=True)
class CopyPair:
    copy_id: str
    original_id: str
    jaccard: float
    shard: int | None = None  # where the original is, when it is in a shard index
    slice: int | None = None


def near_copies_within(ids: Sequence[str], texts: Sequence[str], query_rows: Sequence[int], minhash: MinHashParams,
                       threshold: float, signatures: np.ndarray | None = None) -> list[CopyPair]:
    """For each row in ``query_rows``, the other rows of the batch with exact Jaccard >= ``threshold``."""
    if not len(query_rows) or len(ids) < 2:
        return []
    sigs = signatures if signatures is not None else minhash_signatures(texts, minhash)
    bands = BandIndex.build(sigs, choose_params(min(threshold, 0.99), minhash.num_perm))
    k = minhash.shingle_size
    sets: dict[int, frozenset[str]] = {}

    def set_of(row: int) -> frozenset[str]:
        if row not in sets:
            sets[row] = shingle_set(texts[row], k)
        return sets[row]

    out = []
    for q, cand in zip(query_rows, bands.candidates(sigs[list(query_rows)])):
        for r in cand.tolist():
            if r != q:
                j = exact_jaccard(set_of(q), set_of(r))
                if j >= threshold:
                    out.append(CopyPair(ids[q], ids[r], j))
    return out


def near_copies_in_index(index: ShardIndex, fetch_texts: Callable[[int, Sequence[str]], list[str]],
                         ids: Sequence[str], texts: Sequence[str], threshold: float,
                         signatures: np.ndarray | None = None) -> list[CopyPair]:
    """For each of ``ids``/``texts``, the records of one shard version with exact Jaccard >= ``threshold``."""
    if not len(ids) or index.n == 0:
        return []
    sigs = signatures if signatures is not None else minhash_signatures(texts, index.minhash)
    candidates = index.minhash_candidates(sigs)
    rows = sorted({int(r) for cand in candidates for r in cand})
    if not rows:
        return []
    k = index.minhash.shingle_size
    fetched = dict(zip(rows, fetch_texts(index.shard, [index.record_ids[r] for r in rows])))
    row_sets = {r: shingle_set(t, k) for r, t in fetched.items()}
    out = []
    for q, cand in enumerate(candidates):
        if not len(cand):
            continue
        query = shingle_set(texts[q], k)
        for r in cand.tolist():
            j = exact_jaccard(query, row_sets[r])
            if j >= threshold:
                out.append(CopyPair(ids[q], str(index.record_ids[r]), j, index.shard, int(index.slices[r])))
    return out
