"""Locate every record of a subject: identifiers, MinHash near-copies, embedding neighbours, second hop.

The walk for one request::

    hop 0   seeds   = records holding one of the subject's identifiers (erase)
            queries = the request's samples
    hop h   queries = the texts of the records decided "erase" so far and not
                      yet used as queries (seeds included), for h = 1 .. hops

Every query text looks in every shard: MinHash LSH candidates, each verified by
the exact Jaccard similarity of word-shingle sets, and FAISS neighbours at or
above the review cosine or standing out of its neighbourhood by the margin
(:mod:`dedup.paraphrase`; each such match carries its evidence). A record found more than once keeps its strongest
match (:meth:`Match.outranks`). Matches found from a record's text are marked
``second-hop``: copies of the subject's posts reposted by others without the
identifier. A record is used as a query at most once, and only once it is
decided "erase" (a record under review does not widen the search), so cycles
end and the work is bounded by ``hops``.

Each match carries its provenance (:class:`Provenance`): ``seed``, ``second-hop``
(found from a seed's text, or from a record found that way), or ``sample``
(found only from a requester's sample, or from a record found that way). A
sample-only match is decided by ``Thresholds.sample_only``: review by default.
A text already queried is queried again only when it comes with a stronger
provenance (a seed whose text equals a sample).

Nothing is changed: this is the dry run that ``erasure locate`` prints, and the
input to erasure once reviewed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dedup.embeddings import Embedder
from dedup.minhash import MinHashParams, minhash_signatures
from dedup.normalize import exact_jaccard, shingle_set, words
from dedup.paraphrase import ParaphraseEvidence, knn_means, lead_over_runner_up, ratio_margin, shared_spans
from dedup.policy import (Decision, Match, Method, Metric, Provenance, SampleOnly, Thresholds, default_thresholds,
                          paraphrase_score)
from dedup.shard_index import ShardIndex

MAX_SAMPLE_BYTES = 100_000
MAX_SAMPLES = 100
DEFAULT_HOPS = 1

FetchTexts = Callable[[int, Sequence[str]], Sequence[str]]


@dataclass(frozen=True)
class SeedRecord:
    """A record that carries one of the subject's identifiers (found by keyed-hash lookup)."""

    shard: int
    record_id: str
    identifier_kind: str


@dataclass(frozen=True)
class LocateRequest:
    """What the subject gave: identifiers as (kind, value) and content samples."""

    identifiers: tuple[tuple[str, str], ...] = ()
    samples: tuple[str, ...] = ()

    @classmethod
    def parse(
        cls,
        identifiers: Iterable[str | tuple[str, str]] = (),
        samples: Iterable[str] = (),
        sample_files: Iterable[str | Path] = (),
        *,
        known_kinds: Sequence[str] | None = None,
        max_sample_bytes: int = MAX_SAMPLE_BYTES,
        max_samples: int = MAX_SAMPLES,
    ) -> LocateRequest:
        """Validate a request; every error says what to change.

        ``identifiers`` are ``"kind=value"`` strings or ``(kind, value)`` pairs;
        ``known_kinds`` defaults to :data:`dedup.identifiers.IDENTIFIER_KINDS`.
        """
        from dedup.identifiers import IDENTIFIER_KINDS, normalize_identifier

        kinds = tuple(known_kinds) if known_kinds is not None else IDENTIFIER_KINDS
        pairs = []
        for item in identifiers:
            if isinstance(item, str):
                kind, sep, value = item.partition("=")
                if not sep:
                    raise ValueError(f"identifier {item!r} needs the form kind=value, e.g. email=a@example.com")
            else:
                kind, value = item
            kind = kind.strip()
            if kind not in kinds:
                raise ValueError(f"unknown identifier type {kind!r}; use one of: {', '.join(kinds)}")
            _check_utf8(value, f"identifier {kind}")
            normalize_identifier(kind, value)  # raises ValueError naming the fix
            pairs.append((kind, value))
        texts = [_check_sample(s, f"sample {i + 1}", max_sample_bytes) for i, s in enumerate(samples)]
        for path in sample_files:
            texts.append(_check_sample(read_sample_file(path, max_sample_bytes), f"sample file {path}",
                                       max_sample_bytes))
        if not pairs and not texts:
            raise ValueError("an erasure request needs at least one identifier or sample: "
                             "pass --identifier kind=value, --sample TEXT or --sample-file FILE")
        if len(texts) > max_samples:
            raise ValueError(f"{len(texts)} samples; at most {max_samples} per request: keep the passages that matter")
        return cls(tuple(pairs), tuple(texts))


def decode_sample(data: bytes, source: str = "sample") -> str:
    """Strict UTF-8 decoding with an error that says where and what to do."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{source} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                         "convert it first, e.g. iconv -f latin1 -t utf-8") from None


def read_sample_file(path: str | Path, max_bytes: int = MAX_SAMPLE_BYTES) -> str:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sample file {path} does not exist or is not a file")
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"sample file {path} has {size:,} bytes; the limit is {max_bytes:,} bytes per sample: "
                         "pass only the passages that were copied, as several samples if needed")
    return decode_sample(path.read_bytes(), f"sample file {path}")


def _check_utf8(text: str, source: str) -> None:
    if not isinstance(text, str):
        raise ValueError(f"{source} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates, e.g. undecodable bytes in a command line
        raise ValueError(f"{source} is not valid UTF-8 (character {exc.start}); pass UTF-8 text") from None


def _check_sample(text: str, source: str, max_bytes: int) -> str:
    _check_utf8(text, source)
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise ValueError(f"{source} has {size:,} bytes; the limit is {max_bytes:,} bytes per sample: "
                         "pass only the passages that were copied, as several samples if needed")
    if not words(text):
        raise ValueError(f"{source} has no words (letters or digits) to compare; pass the text itself")
    return text


@dataclass(frozen=True)
class LocateResult:
    matches: tuple[Match, ...]
    queries: tuple[str, ...]  # labels of the texts used as queries, in order
    unresolved_seeds: tuple[SeedRecord, ...] = ()  # seeds that no loaded shard version holds
    candidates_verified: int = 0
    thresholds: Thresholds = field(default_factory=Thresholds)
    hops: int = DEFAULT_HOPS

    def by_decision(self, decision: Decision | str) -> tuple[Match, ...]:
        decision = Decision(decision)
        return tuple(m for m in self.matches if m.decision is decision)

    def to_dict(self) -> dict:
        counts = {d.value: sum(m.decision is d for m in self.matches) for d in Decision}
        return {"matches": [m.to_dict() for m in self.matches], "counts": counts, "queries": list(self.queries),
                "unresolved_seeds": [{"shard": s.shard, "record_id": s.record_id} for s in self.unresolved_seeds],
                "candidates_verified": self.candidates_verified, "thresholds": self.thresholds.to_dict(),
                "hops": self.hops}


class _Search:
    """The state of one locate run."""

    def __init__(self, indexes: Mapping[int, ShardIndex], fetch_texts: FetchTexts, embedder: Embedder | None,
                 thresholds: Thresholds, report_keep: bool, nprobe: int | None) -> None:
        self.indexes, self.fetch_texts, self.embedder, self.nprobe = indexes, fetch_texts, embedder, nprobe
        self.thresholds, self.report_keep = thresholds, report_keep
        self.matches: dict[tuple[int, str], Match] = {}
        self.queried: set[tuple[int, str]] = set()
        self.seen_texts: dict[str, int] = {}  # text -> the strongest provenance rank it was queried with
        self.labels: list[str] = []
        self.verified = 0
        params = {idx.minhash for idx in indexes.values()}
        if len(params) > 1:
            raise ValueError("the shard indexes were built with different MinHash parameters; rebuild them alike")
        self.minhash: MinHashParams = params.pop() if params else MinHashParams()

    def offer(self, match: Match) -> None:
        if match.decision is Decision.KEEP and not self.report_keep:
            return
        old = self.matches.get(match.key)
        if old is None or match.outranks(old):
            self.matches[match.key] = match

    def is_erased(self, shard: int, record_id: str) -> bool:
        m = self.matches.get((shard, record_id))
        return m is not None and m.decision is Decision.ERASE

    def run(self, queries: list[tuple[str, str, Provenance]], hop: int) -> None:
        fresh = []
        for label, text, provenance in queries:  # an identical text finds nothing new, unless better grounded
            if self.seen_texts.get(text, -1) < provenance.rank:
                self.seen_texts[text] = provenance.rank
                fresh.append((label, text, provenance))
        if not fresh:
            return
        self.labels += [label for label, _, _ in fresh]
        texts = [text for _, text, _ in fresh]
        k = self.minhash.shingle_size
        signatures = minhash_signatures(texts, self.minhash)
        query_sets = [shingle_set(t, k) for t in texts]
        vectors = self.embedder.embed(texts) if self.embedder is not None else None
        near = Method.MINHASH if hop == 0 else Method.SECOND_HOP
        para = Method.EMBEDDING if hop == 0 else Method.SECOND_HOP
        for shard, idx in self.indexes.items():
            candidates = idx.minhash_candidates(signatures)
            rows = sorted({int(r) for cand in candidates for r in cand
                           if not self.is_erased(shard, idx.record_ids[r])})
            if rows:
                fetched = self.fetch_texts(shard, [idx.record_ids[r] for r in rows])
                sets = {r: shingle_set(t, k) for r, t in zip(rows, fetched)}
                self.verified += len(rows)
                for q, cand in enumerate(candidates):
                    for r in cand.tolist():
                        if r in sets:
                            score = exact_jaccard(query_sets[q], sets[r])
                            self.offer(self._match(idx, r, near, Metric.JACCARD, score, hop, fresh[q][0],
                                                   fresh[q][2]))
        if vectors is not None:
            self._paraphrases(fresh, query_sets, vectors, hop, para)

    def _paraphrases(self, fresh: list[tuple[str, str, Provenance]], query_sets: list, vectors, hop: int,
                     method: Method) -> None:
        """Embedding neighbours decided by margin and cosine (:meth:`Thresholds.decide_paraphrase`).

        Per shard: the query's top ``K`` records (its neighbourhood mean and the candidates for the
        margin rule) and every record at ``cosine_review`` or above; ranks are taken over all shards."""
        t = self.thresholds
        found: list[list[tuple[ShardIndex, int, float, float]]] = [[] for _ in fresh]
        for idx in self.indexes.values():
            if idx.vectors is None:
                continue
            top_k = max(idx.knn_k, t.margin_max_rank, 1)
            # The subject's records already decided erase are not neighbours of the query: from the
            # second hop the query *is* one of them (cosine 1 at rank 1), which pushed a paraphrase of
            # it to rank 2, out of the rank-1 rule's reach, and inflated the query's neighbourhood mean.
            own = {row for (shard, record_id), m in self.matches.items()
                   if shard == idx.shard and m.decision is Decision.ERASE and (row := idx.row(record_id)) is not None}
            rows, sims = idx.nearest(vectors, top_k + len(own), self.embedder, self.nprobe)
            if own:
                rows, sims = _without_rows(rows, sims, own, top_k)
            query_means = knn_means(sims[:, :idx.knn_k])
            # Every record at cosine_review or above is already in the top k unless the k-th is too
            # (same probed cells): the range search runs only for those queries
            wide = [q for q in range(len(fresh)) if rows.shape[1] and rows[q, -1] >= 0
                    and sims[q, -1] >= t.cosine_review]
            ranged = dict(zip(wide, idx.embedding_neighbours(vectors[wide], t.cosine_review, self.embedder,
                                                             self.nprobe))) if wide else {}
            for q in range(len(fresh)):
                cands = {int(r): float(c) for r, c in zip(rows[q], sims[q]) if r >= 0}
                if q in ranged:
                    cands.update((int(r), float(c)) for r, c in zip(*ranged[q]) if int(r) not in own)
                found[q] += [(idx, r, c, float(query_means[q])) for r, c in cands.items()]
        k = self.minhash.shingle_size
        for q, cands in enumerate(found):
            cosines = np.array(sorted((c for _, _, c, _ in cands), reverse=True))
            lead = lead_over_runner_up(cosines)  # the rank-1 neighbour's lead over the runner-up (all shards)
            label, text, provenance = fresh[q]
            chosen = []
            for idx, row, cos, query_mean in cands:
                rank = int(np.searchsorted(-cosines, -cos, side="left")) + 1  # 1 + how many are strictly closer
                if self.is_erased(idx.shard, idx.record_ids[row]):
                    continue
                in_reach = (t.margin_max_rank and rank <= t.margin_max_rank) or cos >= t.cosine_review
                if not (in_reach or (self.report_keep and rank <= max(t.margin_max_rank, 1))):
                    continue
                record_mean = float(idx.knn_mean[row]) if idx.knn_mean is not None else float("nan")
                chosen.append((idx, row, cos, rank, query_mean, record_mean))
            by_shard: dict[int, list[tuple]] = {}
            for item in chosen:
                by_shard.setdefault(item[0].shard, []).append(item)
            for shard, items in by_shard.items():
                texts = self.fetch_texts(shard, [it[0].record_ids[it[1]] for it in items])
                for (idx, row, cos, rank, query_mean, record_mean), other in zip(items, texts):
                    margin = ratio_margin(cos, query_mean, record_mean)
                    spans = tuple(shared_spans(text, other))
                    jaccard = exact_jaccard(query_sets[q], shingle_set(other, k))
                    longest = max((len(s.split()) for s in spans), default=0)
                    own_lead = lead if rank == 1 else 0.0
                    decision, judged = t.judge_paraphrase(cos, margin, rank, provenance, longest, jaccard, own_lead)
                    evidence = ParaphraseEvidence(cos, margin, rank, query_mean, record_mean, jaccard, spans,
                                                  tuple(sentence for _, sentence in judged), own_lead,
                                                  paraphrase_score(margin, rank, own_lead, t.lead_weight),
                                                  tuple(code for code, _ in judged))
                    self.offer(Match(idx.shard, idx.version, int(idx.slices[row]), idx.record_ids[row], method,
                                     Metric.COSINE, float(cos), decision, hop, label, provenance, evidence))

    def _match(self, idx: ShardIndex, row: int, method: Method, metric: Metric, score: float, hop: int,
               query: str, provenance: Provenance) -> Match:
        return Match(idx.shard, idx.version, int(idx.slices[row]), idx.record_ids[row], method, metric,
                     float(score), self.thresholds.decide(metric, score, provenance), hop, query, provenance)


def _without_rows(rows: np.ndarray, sims: np.ndarray, left_out: set[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's neighbours (ids, similarities; best first) without ``left_out``, the first ``k``
    of the rest, padded with id -1 and similarity NaN."""
    keep = ~np.isin(rows, np.fromiter(left_out, np.int64, len(left_out)))
    out_rows, out_sims = np.full((len(rows), k), -1, np.int64), np.full((len(rows), k), np.nan, np.float32)
    for q in range(len(rows)):
        kept_rows, kept_sims = rows[q][keep[q]][:k], sims[q][keep[q]][:k]
        out_rows[q, :len(kept_rows)], out_sims[q, :len(kept_sims)] = kept_rows, kept_sims
    return out_rows, out_sims


def _derived(provenance: Provenance) -> Provenance:
    """The provenance of a match found from the text of a record of ``provenance``."""
    return Provenance.SAMPLE if provenance is Provenance.SAMPLE else Provenance.SECOND_HOP


def embedder_for(indexes: Mapping[int, ShardIndex]) -> Embedder | None:
    """The embedder that built the indexes (they must agree), ready for queries; None without vectors."""
    from dedup.embeddings import embedder_from_spec

    specs = [idx.embedder for idx in indexes.values() if idx.embedder is not None]
    if not specs:
        return None
    if any(spec != specs[0] for spec in specs):
        raise ValueError("the shard indexes were built with different embedders; rebuild them with one")
    return embedder_from_spec(specs[0])


def locate_matches(
    request: LocateRequest,
    indexes: Mapping[int, ShardIndex],
    fetch_texts: FetchTexts,
    *,
    lookup: Callable[[str, str], Iterable[SeedRecord]] | None = None,
    seeds: Iterable[SeedRecord] = (),
    embedder: Embedder | None = None,
    thresholds: Thresholds | None = None,
    hops: int = DEFAULT_HOPS,
    report_keep: bool = False,
    nprobe: int | None = None,
    sample_only: SampleOnly | str | None = None,
) -> LocateResult:
    """All records of the subject in ``indexes`` (shard -> its current version's index).

    ``lookup(kind, value)`` returns the records holding an identifier (the
    caller's keyed-hash index); ``seeds`` may be given instead or as well.
    ``fetch_texts(shard, record_ids)`` returns the records' texts, for exact
    verification and as second-hop queries. ``embedder`` must be the one the
    indexes were built with (:func:`embedder_for`; None skips the embedding
    search). ``report_keep`` also lists verified candidates below the review
    thresholds; ``nprobe`` overrides how many IVF cells a vector search reads.
    ``sample_only`` overrides ``thresholds.sample_only`` (how matches reached only
    from a sample are decided; review by default).
    """
    if hops < 0:
        raise ValueError(f"hops must be 0 or more, got {hops}; 1 (the default) also searches from the seeds' texts")
    if request.identifiers and lookup is None:
        raise ValueError("the request has identifiers but no lookup was given: pass lookup=(kind, value) -> seeds")
    thresholds = thresholds or default_thresholds(embedder.name if embedder is not None else None)
    if sample_only is not None:
        thresholds = thresholds.with_changes(sample_only=SampleOnly(sample_only))
    search = _Search(indexes, fetch_texts, embedder, thresholds, report_keep, nprobe)

    all_seeds = list(seeds)
    for kind, value in request.identifiers:
        all_seeds += list(lookup(kind, value))
    unresolved = []
    for seed in all_seeds:
        idx = indexes.get(seed.shard)
        row = idx.row(seed.record_id) if idx is not None else None
        if row is None:
            unresolved.append(seed)
            continue
        search.offer(Match(idx.shard, idx.version, int(idx.slices[row]), seed.record_id, Method.IDENTIFIER,
                           Metric.IDENTIFIER, 1.0, Decision.ERASE, 0, f"identifier:{seed.identifier_kind}",
                           Provenance.SEED))

    search.run([(f"sample:{i + 1}", s, Provenance.SAMPLE) for i, s in enumerate(request.samples)], hop=0)
    for hop in range(1, hops + 1):
        frontier = sorted(key for key, m in search.matches.items()
                          if m.decision is Decision.ERASE and key not in search.queried)
        if not frontier:
            break
        search.queried.update(frontier)
        queries = []
        for shard in sorted({s for s, _ in frontier}):
            ids = [rid for s, rid in frontier if s == shard]
            queries += [(f"record:{shard}/{rid}", text, _derived(search.matches[(shard, rid)].provenance))
                        for rid, text in zip(ids, fetch_texts(shard, ids))]
        search.run(queries, hop)

    ordered = sorted(search.matches.values(),
                     key=lambda m: (-m.decision.rank, m.shard, m.slice, m.record_id))
    return LocateResult(tuple(ordered), tuple(search.labels), tuple(unresolved), search.verified, thresholds, hops)
