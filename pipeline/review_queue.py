"""The review queue of a request, as a reviewer sees it: for each borderline match the
text that found it (the requester's sample, or the subject's own record that seeded
the search) beside the matched record's text, with the word spans they share.

Shared spans are the words that lie in a word 5-gram present in both texts: exactly
the shingles whose overlap Jaccard measures,

    J(A, B) = |S(A) ∩ S(B)| / |S(A) ∪ S(B)|,   S(x) = the word 5-grams of x,

so a highlighted run is evidence of copied wording. Cosine is that of the dataset's
embedder (the one its index was built with): cos(a, b) = a·b / (|a| |b|).

An embedding match also shows the paraphrase evidence recorded when it was found
(``request_matches.paraphrase_evidence``: cosine, rank among the query's neighbours,
ratio margin, lead over the runner-up, score, reason codes), against the score its rank
had to reach; those are numbers only, so they stay after the texts are gone.

Texts are read only while the request is open (samples are purged at completion,
and the records' shard files once erased); callers show nothing but ids after that.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Dataset, ShardVersion
from db.training import RequestMatch
from dedup.normalize import DEFAULT_SHINGLE_SIZE, exact_jaccard, shingle_set
from dedup.policy import PARAPHRASE_REASONS, default_thresholds
from db.settings import Settings
from pipeline.erasure import REVIEW, request_matches
from pipeline.object_store import shard_file
from pipeline.lifecycle import review_verdicts, sample_texts

_WORD = re.compile(r"[^\W_]+")


@dataclass(frozen=True)
class Segment:
    text: str
    shared: bool


@dataclass(frozen=True)
class ReviewItem:
    match_ref: str
    dataset: str
    shard: int
    record_id: str
    method: str
    metric: str
    score: float
    provenance: str
    query_label: str  # "sample 1", "the subject's record 0/r12"
    query_segments: tuple[Segment, ...] | None  # None: the text is gone (purged or unreadable)
    record_segments: tuple[Segment, ...] | None
    jaccard: float | None
    cosine: float | None
    decision: str | None  # the reviewer's verdict so far, if any
    paraphrase: dict | None = None  # an embedding match's evidence as recorded (numbers and reason codes only)


def word_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, normalised word) of each word of ``text``, as ``dedup.normalize.words`` finds them."""
    out = []
    for m in _WORD.finditer(text):
        for word in _WORD.findall(unicodedata.normalize("NFKC", m.group()).casefold()):
            out.append((m.start(), m.end(), word))
    return out


def shared_segments(text: str, other: str, k: int = DEFAULT_SHINGLE_SIZE) -> tuple[Segment, ...]:
    """``text`` cut into runs, each marked shared when its words lie in a word k-gram of ``other``."""
    spans = word_spans(text)
    theirs = shingle_set(other, k)
    marked = [False] * len(spans)
    words = [w for _, _, w in spans]
    if len(words) < k:
        if words and " ".join(words) in theirs:
            marked = [True] * len(spans)
    else:
        for i in range(len(words) - k + 1):
            if " ".join(words[i:i + k]) in theirs:
                marked[i:i + k] = [True] * k
    # a separator between two shared words is shared too, so a copied phrase is one run
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for i, ((start, end, _), shared) in enumerate(zip(spans, marked)):
        if start > cursor:
            pieces.append((text[cursor:start], shared and i > 0 and marked[i - 1]))
        pieces.append((text[start:end], shared))
        cursor = end
    if cursor < len(text):
        pieces.append((text[cursor:], False))
    segments: list[Segment] = []
    for piece, shared in pieces:
        if segments and segments[-1].shared == shared:
            segments[-1] = Segment(segments[-1].text + piece, shared)
        else:
            segments.append(Segment(piece, shared))
    return tuple(segments)


def _record_texts(session: Session, dataset_id: int, wanted: set[tuple[int, int, str]],
                  settings: Settings | None) -> dict[tuple[int, str], str]:
    """(shard, record id) -> text, read from the shard version each was matched in (if its file is still there)."""
    by_version: dict[tuple[int, int], set[str]] = {}
    for shard, version, record_id in wanted:
        by_version.setdefault((shard, version), set()).add(record_id)
    out: dict[tuple[int, str], str] = {}
    for (shard, version), ids in sorted(by_version.items()):
        row = session.scalars(select(ShardVersion).where(
            ShardVersion.dataset_id == dataset_id, ShardVersion.shard == shard, ShardVersion.version == version)).first()
        if row is None or row.files_purged_at is not None:
            continue
        try:
            file = row.path if settings is None else shard_file(settings, row)  # a storage URL: fetched here
            table = pq.read_table(file, columns=["record_id", "text"], filters=[("record_id", "in", sorted(ids))])
        except (OSError, ValueError):
            continue  # the file is gone: the page shows ids only
        out.update({(shard, rid): text for rid, text in
                    zip(table.column("record_id").to_pylist(), table.column("text").to_pylist())})
    return out


def _seed_place(matches: list[RequestMatch], label: str) -> tuple[int, int, str] | None:
    """The (shard, version, record id) a ``record:<shard>/<id>`` query label names, from the request's matches."""
    shard, _, record_id = label.removeprefix("record:").partition("/")
    for m in matches:
        if str(m.shard) == shard and m.record_id == record_id:
            return m.shard, m.shard_version, m.record_id
    return None


def _cosines(dataset: Dataset, pairs: list[tuple[str, str]]) -> list[float | None]:
    from pipeline.locate import dataset_embedder

    if not pairs:
        return []
    embedder = dataset_embedder(dataset.embedder, dataset.feature_dim)
    vectors = np.asarray(embedder.embed([t for pair in pairs for t in pair]), dtype=np.float64)
    out: list[float | None] = []
    for i in range(len(pairs)):
        a, b = vectors[2 * i], vectors[2 * i + 1]
        norm = float(np.linalg.norm(a) * np.linalg.norm(b))
        out.append(float(a @ b) / norm if norm else None)
    return out


def review_items(session: Session, request_id: str, *, with_texts: bool,
                 settings: Settings | None = None) -> list[ReviewItem]:
    """The request's borderline matches (those policy sent to review), each with its
    verdict so far; with ``with_texts`` also both texts, the shared spans, Jaccard and cosine."""
    matches = request_matches(session, request_id)
    borderline = [m for m in matches if m.decision == REVIEW]
    verdicts = review_verdicts(session, request_id)
    samples = sample_texts(session, request_id) if with_texts else []
    items: list[ReviewItem] = []
    by_dataset: dict[int, list[RequestMatch]] = {}
    for m in borderline:
        by_dataset.setdefault(m.dataset_id, []).append(m)
    for dataset_id, found in sorted(by_dataset.items()):
        dataset = session.get(Dataset, dataset_id)
        thresholds = default_thresholds(dataset.embedder).to_dict()  # as the console states them
        texts: dict[tuple[int, str], str] = {}
        if with_texts:
            wanted = {(m.shard, m.shard_version, m.record_id) for m in found}
            wanted |= {place for m in found if m.query.startswith("record:")
                       if (place := _seed_place([x for x in matches if x.dataset_id == dataset_id], m.query))}
            texts = _record_texts(session, dataset_id, wanted, settings)
        pairs: list[tuple[str | None, str | None]] = []
        for m in found:
            query_text = None
            if with_texts and m.query.startswith("sample:"):
                index = int(m.query.partition(":")[2]) - 1
                query_text = samples[index] if 0 <= index < len(samples) else None
            elif with_texts and m.query.startswith("record:"):
                shard, _, rid = m.query.removeprefix("record:").partition("/")
                query_text = texts.get((int(shard), rid)) if shard.isdigit() else None
            pairs.append((query_text, texts.get((m.shard, m.record_id))))
        complete = [(q, r) for q, r in pairs if q is not None and r is not None]
        cosines = iter(_cosines(dataset, complete) if complete else [])
        for m, (query_text, record_text) in zip(found, pairs):
            both = query_text is not None and record_text is not None
            items.append(ReviewItem(
                match_ref=m.match_ref, dataset=dataset.name, shard=m.shard, record_id=m.record_id, method=m.method,
                metric=m.metric, score=m.score, provenance=m.provenance or "seed", query_label=_label(m.query),
                query_segments=shared_segments(query_text, record_text) if both else None,
                record_segments=shared_segments(record_text, query_text) if both else None,
                jaccard=exact_jaccard(shingle_set(query_text), shingle_set(record_text)) if both else None,
                cosine=next(cosines) if both else None,
                decision=verdicts.get(m.match_ref) or (m.final_decision if m.final_decision else None),
                paraphrase=recorded_evidence(m, thresholds),
            ))
    return items


def recorded_evidence(match: RequestMatch, thresholds: dict) -> dict | None:
    """The paraphrase evidence stored with an embedding match (``ParaphraseEvidence.numbers``), with
    each reason code in words (``reasons``) and the score its rank had to reach for review under
    ``thresholds`` (``review_at``, :func:`paraphrase_bar`); None for other matches and rows from before 0016."""
    if match.paraphrase_evidence is None:
        return None
    evidence = json.loads(match.paraphrase_evidence)
    words = [PARAPHRASE_REASONS.get(code, code) for code in evidence.get("reason_codes", [])
             if code != "jaccard"]  # the Jaccard is shown as a number beside it
    return {**evidence, "reasons": words,
            "review_at": paraphrase_bar(evidence, thresholds)}


def paraphrase_bar(evidence: dict, thresholds: dict) -> float | None:
    """The score a paraphrase match of this rank had to reach for review under ``thresholds``
    (``Thresholds.to_dict``): ``margin_review`` at rank 1, ``margin_review_lower`` below; None
    where the margin rule does not apply (off for the embedder, or the rank or cosine out of its reach)."""
    rank, cosine = evidence.get("rank"), evidence.get("cosine")
    if not thresholds["margin_max_rank"] or rank is None or rank > thresholds["margin_max_rank"]:
        return None
    if cosine is None or cosine < thresholds["cosine_floor"]:
        return None
    return thresholds["margin_review"] if rank == 1 else thresholds["margin_review_lower"]


def _label(query: str) -> str:
    kind, _, rest = query.partition(":")
    if kind == "sample":
        return f"the requester's sample {rest}"
    if kind == "record":
        return f"the subject's record {rest}"
    return query
