"""Paraphrase evidence: the neighbourhood margin of an embedding match, and the words it shares.

An absolute cosine cut does not transfer between corpora: a dense corpus (many
texts from one template, one topic) puts unrelated texts at cosine 0.85, while
a real paraphrase of an unusual text may sit at 0.7. Bitext mining (Artetxe &
Schwenk 2019, "Margin-based parallel corpus mining") scores a pair against the
neighbourhoods of both sides instead::

    r_q = mean cosine of the query's k nearest records
    r_c = mean cosine of the candidate's k nearest other records
    margin(q, c) = cos(q, c) / ((r_q + r_c) / 2)          (ratio margin)

A pair that stands out of both neighbourhoods has a margin above 1; a record in
a crowd of look-alikes (same template) has a margin near 1 whatever its cosine.
``r_c`` depends only on the stored records, so it is computed once at ingest and
stored beside the index (:func:`knn_means`); a query then needs only its own k
neighbours per shard, which the search returns anyway. Both means are taken
within the candidate's shard, so they are on one scale.

The margin alone misses a true pair whose neighbourhood is dense: a verse among
its chapter's verses reaches margin 1.1 while standing clearly ahead of the
runner-up. The rank-1 neighbour is therefore favoured by its *lead*, how far its
cosine stands above the second-nearest record's (:func:`lead_over_runner_up`,
:func:`dedup.policy.paraphrase_score`)::

    score(q, c) = margin(q, c) + lead_weight * (cos(q, c) - cos(q, second))   (rank 1)
    score(q, c) = margin(q, c)                                                  (other ranks)

Two records tied at rank 1 (copies of one text) have no lead. On the calibration
set, 57 % of the true pairs the margin missed were such rank-1 matches; the
lead recovers 64 of those 103 (held-out recall 0.883 -> 0.921 at precision
0.988; ``bench_paraphrase.py``).

Lexical evidence is kept beside it: the word spans the two texts share
(:func:`shared_spans`) and the Jaccard similarity of their word-shingle sets.
A rank-1 neighbour that shares a span of several words may pass at a lower
score (the policy's ``margin_review_spans``); without a shared span the
embedding score alone decides, so a corpus of paraphrases that share no words
loses nothing by it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import numpy as np

from dedup.normalize import words

DEFAULT_K = 4  # Artetxe & Schwenk's k; k = 2..8 changes little (bench_paraphrase)
MIN_SPAN_WORDS = 3
MAX_SPANS = 5


def knn_means(similarities: np.ndarray) -> np.ndarray:
    """Row means of a (n, k) array of the k best cosines per row (descending; NaN = no neighbour).

    Rows without any neighbour get NaN (the margin then falls back on the other side)."""
    sims = np.asarray(similarities, dtype=np.float32)
    if sims.ndim != 2:
        raise ValueError(f"similarities must be (n, k), got shape {sims.shape}")
    valid = ~np.isnan(sims)
    counts = valid.sum(axis=1)
    totals = np.where(valid, sims, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / np.maximum(counts, 1), np.nan).astype(np.float32)


def ratio_margin(cosine: float, query_mean: float, record_mean: float) -> float:
    """``cos / ((r_q + r_c) / 2)``; a missing (NaN) mean is replaced by the other, and a
    neighbourhood mean at or below zero by a small positive floor (the margin stays finite)."""
    if np.isnan(query_mean):
        query_mean = record_mean
    if np.isnan(record_mean):
        record_mean = query_mean
    if np.isnan(query_mean):  # neither side has neighbours: the cosine is all there is
        return float(cosine)
    return float(cosine / max((query_mean + record_mean) / 2.0, 0.05))


def lead_over_runner_up(cosines_desc: np.ndarray) -> float:
    """``cos(rank 1) - cos(rank 2)`` of a query's neighbours (sorted, best first); 0 with fewer than two."""
    c = np.asarray(cosines_desc, dtype=np.float64)
    c = c[~np.isnan(c)]
    return float(c[0] - c[1]) if len(c) >= 2 else 0.0


def shared_spans(a: str, b: str, min_words: int = MIN_SPAN_WORDS, limit: int = MAX_SPANS) -> list[str]:
    """The longest runs of words (normalised) the two texts share, at least ``min_words`` long, longest first."""
    wa, wb = words(a), words(b)
    matcher = difflib.SequenceMatcher(None, wa, wb, autojunk=False)
    spans = [" ".join(wa[m.a:m.a + m.size]) for m in matcher.get_matching_blocks() if m.size >= min_words]
    return sorted(spans, key=lambda s: (-len(s.split()), s))[:limit]


@dataclass(frozen=True)
class ParaphraseEvidence:
    """Why an embedding neighbour is (or is not) a paraphrase: what a reviewer reads."""

    cosine: float
    margin: float
    rank: int  # 1 = the query's nearest record across all shards
    query_knn_mean: float
    record_knn_mean: float
    jaccard: float | None = None
    shared_spans: tuple[str, ...] = ()
    reasons: tuple[str, ...] = field(default=())
    lead: float = 0.0  # rank 1: cosine minus the runner-up's cosine; other ranks 0
    score: float | None = None  # the margin plus the weighted lead (paraphrase_score): what the policy compares
    reason_codes: tuple[str, ...] = ()  # one per reason (dedup.policy.PARAPHRASE_REASONS)

    @property
    def longest_span_words(self) -> int:
        return max((len(s.split()) for s in self.shared_spans), default=0)

    def to_dict(self) -> dict:
        return {**self.numbers(), "shared_spans": list(self.shared_spans), "reasons": list(self.reasons)}

    def numbers(self) -> dict:
        """The evidence without its text: numbers and reason codes (what a match row keeps; the
        shared spans are words of the subject's texts, recomputed from them while they exist)."""
        def num(x: float | None) -> float | None:
            return None if x is None or np.isnan(x) else round(float(x), 6)

        return {"cosine": num(self.cosine), "margin": num(self.margin), "rank": self.rank,
                "query_knn_mean": num(self.query_knn_mean), "record_knn_mean": num(self.record_knn_mean),
                "jaccard": num(self.jaccard), "longest_span_words": self.longest_span_words,
                "lead": num(self.lead), "score": num(self.score), "reason_codes": list(self.reason_codes)}
