"""locate_matches on the demo generator's planted ground truth, the second hop, and bad input."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedup.embeddings import MiniLMEmbedder
from dedup.hashing_embedder import HashingEmbedder
from dedup.locate import LocateRequest, SeedRecord, locate_matches
from dedup.policy import Decision, Method, Metric, Thresholds, default_thresholds
from dedup.shard_index import build_shard_index
from shards.demo_data import _jaccard, _shingles, generate_demo

SHARDS = 3


class Corpus:
    """Demo records split round-robin into shards, with an email lookup and a text store."""

    def __init__(self, records: list[dict], embedder=None) -> None:
        self.records = {r["id"]: r for r in records}
        self.shard_of = {r["id"]: i % SHARDS for i, r in enumerate(records)}
        self.embedder = embedder
        self.indexes = {}
        for s in range(SHARDS):
            rows = [r for r in records if self.shard_of[r["id"]] == s]
            self.indexes[s] = build_shard_index(s, 1, [r["id"] for r in rows], [r["text"] for r in rows],
                                                [i % 4 for i in range(len(rows))], embedder=embedder)
        self.by_identifier = collections.defaultdict(list)
        for r in records:
            for kind in ("email", "user_id", "name"):
                if r.get(kind):
                    self.by_identifier[(kind, r[kind])].append(SeedRecord(self.shard_of[r["id"]], r["id"], kind))

    def lookup(self, kind: str, value: str) -> list[SeedRecord]:
        return self.by_identifier.get((kind, value), [])

    def fetch(self, shard: int, record_ids) -> list[str]:
        return [self.records[r]["text"] for r in record_ids]

    def locate(self, request: LocateRequest, **kw):
        return locate_matches(request, self.indexes, self.fetch, lookup=self.lookup, embedder=self.embedder, **kw)


@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.sampled_from([1200, 2000]))
def test_every_planted_copy_above_the_threshold_is_found_and_nothing_below_keep_is_erased(seed, n):
    demo = generate_demo(n, seed, copy_rate=0.12, subject_rate=0.1)
    corpus = Corpus(demo.records, HashingEmbedder())
    thresholds = default_thresholds("hashing")
    copies = {c["id"]: c for c in demo.copies}
    checked = 0
    for person in demo.persons:
        if not person["copies"]:
            continue
        result = corpus.locate(LocateRequest.parse([f"email={person['email']}"]))
        found = {m.record_id: m for m in result.matches}
        for original in person["originals"]:
            assert found[original].method is Method.IDENTIFIER and found[original].decision is Decision.ERASE
        for cid in person["copies"]:
            truth = copies[cid]
            if truth["kind"] in ("exact", "near") and truth["jaccard"] >= thresholds.jaccard_erase:
                assert found[cid].decision is Decision.ERASE, truth
                checked += 1
            if truth["jaccard"] < thresholds.jaccard_review:
                assert cid not in found or found[cid].decision is not Decision.ERASE, truth
        for m in result.matches:  # every erase is an identifier or a verified Jaccard above the threshold
            if m.decision is Decision.ERASE and m.metric is Metric.JACCARD:
                query = (corpus.records[m.query.split("/", 1)[1]]["text"] if m.query.startswith("record:")
                         else None)
                assert m.score >= thresholds.jaccard_erase
                if query is not None:
                    assert _jaccard(_shingles(query), _shingles(corpus.records[m.record_id]["text"])) == \
                        pytest.approx(m.score)
            elif m.decision is Decision.ERASE:
                assert m.metric is Metric.IDENTIFIER or m.score >= thresholds.cosine_erase
    assert checked > 0


@pytest.fixture(scope="module")
def demo_corpus():
    demo = generate_demo(1500, 11, copy_rate=0.1, subject_rate=0.1)
    return demo, Corpus(demo.records, HashingEmbedder())


def test_samples_find_copies_without_any_identifier(demo_corpus):
    demo, corpus = demo_corpus
    copy = next(c for c in demo.copies if c["kind"] == "exact")
    sample = corpus.records[copy["id"]]["text"]  # the body of the subject's post, as they remember it
    result = corpus.locate(LocateRequest.parse(samples=[sample]), hops=0)
    found = {m.record_id: m for m in result.matches}
    assert found[copy["id"]].method is Method.MINHASH and found[copy["id"]].score == 1.0
    assert found[copy["id"]].hop == 0 and found[copy["id"]].query == "sample:1"
    assert result.queries == ("sample:1",)
    # a match reached only from a sample is reviewed, not erased: it does not widen the search
    assert found[copy["id"]].decision is Decision.REVIEW
    assert corpus.locate(LocateRequest.parse(samples=[sample]), hops=1).queries == ("sample:1",)
    # with the policy that decides sample-only matches by score, the found records' texts are queries too
    wider = corpus.locate(LocateRequest.parse(samples=[sample]), hops=1, sample_only="score")
    assert len(wider.queries) > 1 and {m.record_id for m in wider.matches} >= set(found)


def test_second_hop_is_what_finds_reposts(demo_corpus):
    demo, corpus = demo_corpus
    person = next(p for p in demo.persons if p["copies"])
    request = LocateRequest.parse([f"email={person['email']}"])
    none = corpus.locate(request, hops=0)
    assert {m.record_id for m in none.matches} == set(person["originals"])
    assert none.queries == ()
    one = corpus.locate(request, hops=1)
    hop1 = [m for m in one.matches if m.hop == 1]
    assert hop1 and all(m.method is Method.SECOND_HOP for m in hop1)
    assert all(m.query.startswith("record:") for m in hop1)
    as_dict = one.to_dict()
    assert as_dict["counts"]["erase"] == len(one.by_decision("erase"))
    assert {"shard", "slice", "record_id", "method", "score", "decision"} <= set(as_dict["matches"][0])


def test_chains_of_copies_and_cycles_end():
    base = " ".join(f"word{i}" for i in range(200))
    chain = [base]
    for step in range(1, 6):  # each text a near-copy of the one before, drifting away from the first
        ws = chain[-1].split()
        ws[step * 9] = f"edit{step}"
        chain.append(" ".join(ws))
    records = [{"id": f"c{i}", "text": t, "email": "a@example.com" if i == 0 else None} for i, t in enumerate(chain)]
    records += [{"id": "dup", "text": chain[1]}]  # an exact duplicate: queried text is skipped, record found
    corpus = Corpus(records)
    request = LocateRequest.parse(["email=a@example.com"])
    strict = Thresholds(jaccard_erase=0.9, jaccard_review=0.5)
    results = {h: corpus.locate(request, hops=h, thresholds=strict) for h in (0, 1, 5, 50)}
    erased = {h: {m.record_id for m in r.by_decision("erase")} for h, r in results.items()}
    assert erased[0] == {"c0"}
    assert erased[0] < erased[1] <= erased[5]
    assert erased[5] == erased[50]  # the walk ends by itself
    assert len(results[50].queries) == len(set(results[50].queries))


def test_bad_input_is_rejected_with_a_hint(tmp_path):
    with pytest.raises(ValueError, match="at least one identifier or sample"):
        LocateRequest.parse()
    with pytest.raises(ValueError, match="unknown identifier type 'passport'"):
        LocateRequest.parse(["passport=X123"])
    with pytest.raises(ValueError, match="kind=value"):
        LocateRequest.parse(["a@example.com"])
    with pytest.raises(ValueError, match="email"):
        LocateRequest.parse(["email=not-an-address"])
    with pytest.raises(ValueError, match="limit is 100,000 bytes"):
        LocateRequest.parse(samples=["word " * 30_000])
    big = tmp_path / "big.txt"
    big.write_bytes(b"word " * 30_000)
    with pytest.raises(ValueError, match="limit"):
        LocateRequest.parse(sample_files=[big])
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café crème".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8.*iconv"):
        LocateRequest.parse(sample_files=[latin1])
    with pytest.raises(ValueError, match="not valid UTF-8"):
        LocateRequest.parse(samples=["bad \udcff bytes"])  # how Python hands over undecodable argv bytes
    with pytest.raises(ValueError, match="no words"):
        LocateRequest.parse(samples=["!!! ..."])
    with pytest.raises(ValueError, match="does not exist"):
        LocateRequest.parse(sample_files=[tmp_path / "missing.txt"])
    ok = LocateRequest.parse(["email=A@Example.com", ("user_id", "u1")], ["a sample"])
    assert ok.identifiers == (("email", "A@Example.com"), ("user_id", "u1")) and ok.samples == ("a sample",)
    with pytest.raises(ValueError, match="lookup"):
        locate_matches(ok, {}, lambda s, ids: [])
    with pytest.raises(ValueError, match="hops"):
        locate_matches(LocateRequest.parse(samples=["x"]), {}, lambda s, ids: [], hops=-1)
    with pytest.raises(ValueError, match="jaccard_review"):
        Thresholds(jaccard_erase=0.4, jaccard_review=0.5)


def test_seeds_outside_the_loaded_shards_are_reported_not_dropped(demo_corpus):
    _, corpus = demo_corpus
    result = locate_matches(LocateRequest.parse(samples=["hello there"]), corpus.indexes, corpus.fetch,
                            seeds=[SeedRecord(9, "r-gone", "email")])
    assert result.unresolved_seeds == (SeedRecord(9, "r-gone", "email"),)


def test_minilm_embedder_loads_offline_and_sees_paraphrases():
    if os.environ.get("ERASURE_SKIP_MINILM"):
        pytest.skip("ERASURE_SKIP_MINILM is set")
    emb = MiniLMEmbedder()
    v = emb.embed(["My parcel never arrived and the courier left it at the wrong address.",
                   "The delivery driver dropped my package at someone else's house, it never reached me.",
                   "I love the new dark mode in the calendar app."])
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > 0.5 > v[0] @ v[2]
