"""Match policy: what a found record is, how it was found, and what to do with it.

Every match carries a score on its metric's own scale and a decision taken by
:class:`Thresholds` (a score at a threshold takes the stronger decision):

* ``identifier``: the record carries one of the subject's identifiers: erase.
* ``jaccard`` (MinHash candidates, verified exactly on word-5-gram shingle
  sets): ``J >= 0.8`` erase. Two texts at ``J = 0.8`` share ``2J / (1 + J)``,
  about 89%, of each one's shingles (for equally long texts): a copy with a
  handful of words changed, i.e. still the subject's own words.
  ``0.5 <= J < 0.8`` review: heavier edits, quotes, or a shared template; a
  person should look. Below 0.5 keep: stock phrases and templates alone reach
  that much overlap.
* ``cosine`` (embedding neighbours): a paraphrase has other words, so it is
  never provably the subject's text. ``cosine >= cosine_review`` goes to
  review; ``cosine_erase`` defaults to 1.0, so cosine alone erases only a
  vector identical to the query's. On the demo data, near-copies with J < 0.5
  reach cosine 0.93 (hashing) and 0.99 (MiniLM): no cosine threshold separates
  "erase" from "keep", while verified Jaccard does.

Cosine scales differ between embedders, so each has its own review threshold
(:func:`default_thresholds`), set from the demo data's planted copies and the
most similar unrelated texts (``benchmarks/bench_locate.py`` reports a sweep):

* hashing 0.75: above every unrelated neighbour seen (max 0.73) and below its
  near-copies (>= 0.85). It sees words, not meaning: paraphrase recall ~0.
* MiniLM (and ``minilm-int8``): paraphrases by margin, below; the absolute
  cut stays only as a near-copy net at 0.95 (``cosine_review``). The old 0.85
  (tuned on the demo's synthetic paraphrases: recall 0.42 there) found 0.44 of
  real paraphrases; lower cuts put same-template texts (MiniLM scores them
  0.8-0.9) into review by the dozen at 100k records. But the margin rule
  reviews one neighbour per query (rank 1), and a record with several
  near-copies has them all at cosine 0.97-0.99 (a text and its light edits):
  without the net, the copies after the first were left in training whenever
  MinHash's bands missed them (J 0.5-0.6: the demo's residue check found two).

Paraphrases by neighbourhood margin (:mod:`dedup.paraphrase`). The absolute
MiniLM cut at 0.85 was tuned on the demo's synthetic paraphrases and did not
transfer to real ones (recall 0.64). An embedding neighbour now also goes to
review when it stands out of both neighbourhoods: ``cosine >= cosine_floor``,
its rank among the query's neighbours (over all shards) at most
``margin_max_rank``, and its score at least ``margin_review`` (rank 1) or its
ratio margin at least ``margin_review_lower`` (ranks 2 and below). The rank-1
score is the margin plus ``lead_weight`` times its cosine lead over the
runner-up (:func:`paraphrase_score`): in a dense neighbourhood (a verse among
its chapter's verses) the true match's margin is only ~1.1, but it stands
clearly ahead of rank 2. A rank-1 match sharing a ``span_review_words``-word
span with the query may pass at the lower ``margin_review_spans`` (0: off).
``margin_max_rank = 0`` turns the margin rule off (the hashing embedder's
default: it sees words, not meaning). Each such match records its evidence
(cosine, margin, rank, lead, score, shared word spans, shingle Jaccard) and the
reasons for its decision. The MiniLM values were tuned on real paraphrases
(King James / World English Bible verse pairs, the even books;
``benchmarks/bench_paraphrase.py``): score 1.325 with lead weight 3 at rank 1
only, cosine >= 0.5. On the held-out (odd) books: precision 0.988, recall 0.921
(the margin alone at 1.2: 0.986 / 0.883; old 0.85 cut: 0.977 / 0.441); with a
third of the requests holding nothing in the data, precision 0.871. The span
tier is off: on these pairs it added no recall at the precision kept for
requests the data holds nothing for. At most one record per sample goes to
review this way, whatever the dataset's size. A paraphrase is never erased on
its own: at most review.

Provenance. A match is reached from the subject's identifier seeds (``seed``),
from the text of a seed or of a record reached from one (``second-hop``), or
only from a sample the requester sent (``sample``). A sample proves nothing
about whose text it is: anyone can send someone else's post as "mine". So a
match reached only from a sample goes to review whatever its score
(``sample_only = review``, the default); ``sample_only = score`` decides it by
its score like any other (for a controller who verifies the requester's claim
to the samples before intake). The certificate states which applied.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # an annotation only: this module stays free of numpy (see DEFAULT_SCREEN_JACCARD)
    from dedup.paraphrase import ParaphraseEvidence

# Screening incoming texts against the tombstones of earlier erasures (dedup/tombstones.py): the
# estimated Jaccard similarity at or above which a text is held back. Here, in this light module,
# so that the API's schemas take the default without loading numpy and the MinHash code.
DEFAULT_SCREEN_JACCARD = 0.7


class Decision(str, Enum):
    ERASE = "erase"
    REVIEW = "review"
    KEEP = "keep"

    @property
    def rank(self) -> int:
        return {"erase": 2, "review": 1, "keep": 0}[self.value]


class Method(str, Enum):
    IDENTIFIER = "identifier"
    MINHASH = "minhash"
    EMBEDDING = "embedding"
    SECOND_HOP = "second-hop"

    @property
    def rank(self) -> int:
        return {"identifier": 3, "minhash": 2, "second-hop": 1, "embedding": 0}[self.value]


class Provenance(str, Enum):
    """Where the query that found a match came from."""

    SEED = "seed"  # the record carries one of the subject's identifiers
    SECOND_HOP = "second-hop"  # found from the text of a seed (or of a record found from one)
    SAMPLE = "sample"  # found only from a requester-supplied sample (or a record found from one)

    @property
    def rank(self) -> int:
        return {"seed": 2, "second-hop": 1, "sample": 0}[self.value]


class SampleOnly(str, Enum):
    """How a match reached only from a requester's sample is decided."""

    REVIEW = "review"  # at most review, whatever its score (default)
    SCORE = "score"  # by its score, like a match reached from the subject's identifiers


class Metric(str, Enum):
    IDENTIFIER = "identifier"
    JACCARD = "jaccard"
    COSINE = "cosine"

    @property
    def rank(self) -> int:
        return {"identifier": 2, "jaccard": 1, "cosine": 0}[self.value]


# The reason codes of :meth:`Thresholds.judge_paraphrase`, in the words the console shows for them.
# The database keeps a paraphrase match's codes and numbers (ParaphraseEvidence.numbers), never
# its spans: no text of a record or a sample beyond what must be kept.
PARAPHRASE_REASONS = {
    "same_vector": "cosine at or above the erase threshold (the same vector)",
    "margin_review": "stands out of its neighbourhood: score at or above the review bar",
    "margin_review_span": "stands out of its neighbourhood at the lower bar for a shared word span",
    "margin_below": "score below the review bar",
    "margin_out_of_reach": "outside the margin rule (rank or cosine floor)",
    "cosine_review": "cosine at or above the review threshold",
    "shared_span": "shares a run of words with the query",
    "jaccard": "word-shingle Jaccard (a number beside the others)",
}


def paraphrase_score(margin: float, rank: int, lead: float, lead_weight: float) -> float:
    """The margin, plus ``lead_weight`` times the lead over the runner-up for the rank-1 neighbour
    (``lead = cos(rank 1) - cos(rank 2)``, 0 when there is no second record); see :mod:`dedup.paraphrase`."""
    if rank != 1 or math.isnan(lead) or math.isnan(margin):
        return float(margin)
    return float(margin + lead_weight * max(lead, 0.0))


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds; a score at a threshold takes the stronger decision."""

    jaccard_erase: float = 0.8
    jaccard_review: float = 0.5
    cosine_erase: float = 1.0
    cosine_review: float = 0.8
    sample_only: SampleOnly = SampleOnly.REVIEW
    margin_review: float = 1.0
    margin_review_lower: float = 1.0
    margin_max_rank: int = 0  # 0: the margin rule is off
    cosine_floor: float = 0.5
    lead_weight: float = 0.0  # rank 1's score: margin + lead_weight * lead over the runner-up (0: the margin alone)
    margin_review_spans: float = 0.0  # rank 1 sharing a span of span_review_words words: this score suffices (0: off)
    span_review_words: int = 3

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "sample_only", SampleOnly(self.sample_only))
        except ValueError:
            raise ValueError(f"sample_only is one of {', '.join(p.value for p in SampleOnly)}, "
                             f"got {self.sample_only!r}") from None
        for kind in ("jaccard", "cosine"):
            review, erase = getattr(self, f"{kind}_review"), getattr(self, f"{kind}_erase")
            if not 0.0 < review <= erase <= 1.0:
                raise ValueError(
                    f"need 0 < {kind}_review <= {kind}_erase <= 1, got {review} and {erase}; "
                    f"set {kind}_erase = {kind}_review to turn review off")
        if self.margin_max_rank < 0 or self.margin_review <= 0 or self.margin_review_lower <= 0:
            raise ValueError(f"need margin_max_rank >= 0 (0 turns the margin rule off) and margins > 0, got "
                             f"{self.margin_max_rank}, {self.margin_review}, {self.margin_review_lower}")
        if self.lead_weight < 0 or self.margin_review_spans < 0 or self.span_review_words < 1:
            raise ValueError(f"need lead_weight >= 0, margin_review_spans >= 0 (0 turns it off) and "
                             f"span_review_words >= 1, got {self.lead_weight}, {self.margin_review_spans}, "
                             f"{self.span_review_words}")
        if not 0.0 <= self.cosine_floor <= 1.0:
            raise ValueError(f"cosine_floor must lie in [0, 1], got {self.cosine_floor}")

    def decide(self, metric: Metric, score: float, provenance: Provenance = Provenance.SEED) -> Decision:
        if metric is Metric.IDENTIFIER:
            return Decision.ERASE
        erase, review = ((self.jaccard_erase, self.jaccard_review) if metric is Metric.JACCARD
                         else (self.cosine_erase, self.cosine_review))
        if score >= erase:
            if provenance is Provenance.SAMPLE and self.sample_only is SampleOnly.REVIEW:
                return Decision.REVIEW
            return Decision.ERASE
        return Decision.REVIEW if score >= review else Decision.KEEP

    def decide_paraphrase(self, cosine: float, margin: float, rank: int, provenance: Provenance = Provenance.SEED,
                          longest_span_words: int = 0, jaccard: float | None = None,
                          lead: float = 0.0) -> tuple[Decision, tuple[str, ...]]:
        """The decision on an embedding neighbour and the reasons for it, in words a reviewer reads
        (:meth:`judge_paraphrase` without the codes)."""
        decision, reasons = self.judge_paraphrase(cosine, margin, rank, provenance, longest_span_words, jaccard, lead)
        return decision, tuple(sentence for _, sentence in reasons)

    def judge_paraphrase(self, cosine: float, margin: float, rank: int, provenance: Provenance = Provenance.SEED,
                         longest_span_words: int = 0, jaccard: float | None = None,
                         lead: float = 0.0) -> tuple[Decision, tuple[tuple[str, str], ...]]:
        """The decision on an embedding neighbour and its reasons as (code, sentence) pairs:
        the code (:data:`PARAPHRASE_REASONS`) is what the database keeps, the sentence what a reviewer reads.

        Review when the margin rule holds (see the module doc) or ``cosine >= cosine_review``;
        erase only at ``cosine >= cosine_erase`` (an identical vector). At rank 1 the rule compares
        :func:`dedup.paraphrase.paraphrase_score` (the margin plus the weighted lead over the
        runner-up); a shared span of ``span_review_words`` words lowers the bar to
        ``margin_review_spans``. The Jaccard is stated beside it; it decides through the MinHash path."""
        reasons: list[tuple[str, str]] = []
        decision = Decision.KEEP
        if cosine >= self.cosine_erase:
            decision = self.decide(Metric.COSINE, cosine, provenance)
            reasons.append(("same_vector", f"cosine {cosine:.3f} >= {self.cosine_erase} (the same vector)"))
        if self.margin_max_rank and rank <= self.margin_max_rank and cosine >= self.cosine_floor:
            score = paraphrase_score(margin, rank, lead, self.lead_weight)
            what = (f"score {score:.3f} (margin {margin:.3f} + {self.lead_weight:g} x lead {lead:.3f})"
                    if rank == 1 and self.lead_weight else f"margin {margin:.3f}")
            need = self.margin_review if rank == 1 else self.margin_review_lower
            spans_need = (self.margin_review_spans if rank == 1 and self.margin_review_spans
                          and longest_span_words >= self.span_review_words else None)
            if score >= need:
                reasons.append(("margin_review", f"rank {rank} neighbour with {what} >= {need}"))
                decision = max(decision, Decision.REVIEW, key=lambda d: d.rank)
            elif spans_need is not None and score >= spans_need:
                reasons.append(("margin_review_span", f"rank {rank} neighbour with {what} >= {spans_need} and a "
                                                      f"shared {longest_span_words}-word span"))
                decision = max(decision, Decision.REVIEW, key=lambda d: d.rank)
            else:
                reasons.append(("margin_below", f"rank {rank} neighbour, {what} below {need}"))
        elif self.margin_max_rank:
            reasons.append(("margin_out_of_reach", f"rank {rank} neighbour (margin rule: rank <= "
                                                   f"{self.margin_max_rank}, cosine >= {self.cosine_floor})"))
        if self.cosine_review <= cosine < self.cosine_erase:
            reasons.append(("cosine_review", f"cosine {cosine:.3f} >= {self.cosine_review}"))
            decision = max(decision, Decision.REVIEW, key=lambda d: d.rank)
        if longest_span_words:
            reasons.append(("shared_span", f"shares a {longest_span_words}-word span"))
        if jaccard is not None:
            reasons.append(("jaccard", f"word-shingle Jaccard {jaccard:.3f}"))
        return decision, tuple(reasons)

    def to_dict(self) -> dict:
        return {**asdict(self), "sample_only": self.sample_only.value}

    def with_changes(self, **changes: float | str) -> Thresholds:
        return replace(self, **changes)


# Per embedder (see the module doc): hashing from the demo data, MiniLM from real paraphrases.
_MINILM_MARGIN = {"cosine_review": 0.95, "margin_review": 1.325, "margin_review_lower": 1.325, "margin_max_rank": 1,
                  "cosine_floor": 0.5, "lead_weight": 3.0}
_EMBEDDER_COSINES = {
    "hashing": {"cosine_review": 0.75},
    "minilm": _MINILM_MARGIN,
    "minilm-int8": _MINILM_MARGIN,
}


def default_thresholds(embedder_name: str | None = None) -> Thresholds:
    """The default thresholds, with the cosine and margin values of ``embedder_name`` where known."""
    return Thresholds(**_EMBEDDER_COSINES.get(embedder_name or "", {}))


@dataclass(frozen=True)
class Match:
    """One record found for a request; ``query`` says which input found it."""

    shard: int
    shard_version: int
    slice: int
    record_id: str
    method: Method
    metric: Metric
    score: float
    decision: Decision
    hop: int
    query: str
    provenance: Provenance = Provenance.SEED
    paraphrase: ParaphraseEvidence | None = None  # embedding matches: why (see dedup.paraphrase)

    @property
    def key(self) -> tuple[int, str]:
        return (self.shard, self.record_id)

    def outranks(self, other: Match) -> bool:
        """Stronger decision, then provenance (the subject's identifiers before a requester's sample),
        surer evidence (identifier, verified Jaccard, cosine), earlier hop, higher score."""
        return ((self.decision.rank, self.provenance.rank, self.metric.rank, self.method.rank, -self.hop, self.score)
                > (other.decision.rank, other.provenance.rank, other.metric.rank, other.method.rank, -other.hop,
                   other.score))

    def to_dict(self) -> dict:
        return {"shard": self.shard, "shard_version": self.shard_version, "slice": self.slice,
                "record_id": self.record_id, "method": self.method.value, "metric": self.metric.value,
                "score": round(float(self.score), 6), "decision": self.decision.value, "hop": self.hop,
                "query": self.query, "provenance": self.provenance.value,
                **({"paraphrase": self.paraphrase.to_dict()} if self.paraphrase is not None else {})}
