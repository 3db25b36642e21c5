"""The neighbourhood margin of embedding matches and the reasons the policy records for them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dedup.hashing_embedder import HashingEmbedder
from dedup.locate import LocateRequest, SeedRecord, locate_matches
from dedup.paraphrase import knn_means, lead_over_runner_up, ratio_margin, shared_spans
from dedup.policy import Decision, Provenance, Thresholds, paraphrase_score
from dedup.shard_index import ShardIndex, build_shard_index


def test_ratio_margin_divides_by_the_mean_of_both_neighbourhoods() -> None:
    assert ratio_margin(0.8, 0.5, 0.3) == pytest.approx(0.8 / 0.4)
    # one side without neighbours: the other side stands in for it
    assert ratio_margin(0.8, math.nan, 0.4) == pytest.approx(2.0)
    assert ratio_margin(0.8, 0.4, math.nan) == pytest.approx(2.0)
    # a neighbourhood at or below zero does not blow the margin up
    assert ratio_margin(0.3, -0.2, 0.0) == pytest.approx(0.3 / 0.05)


def test_knn_means_ignore_missing_neighbours() -> None:
    sims = np.array([[0.9, 0.7, np.nan], [np.nan, np.nan, np.nan], [0.5, 0.5, 0.2]], np.float32)
    means = knn_means(sims)
    assert means[0] == pytest.approx(0.8) and math.isnan(means[1]) and means[2] == pytest.approx(0.4)


def test_record_neighbourhood_means_leave_the_record_itself_out(tmp_path) -> None:
    # three unit vectors on a circle: each one's nearest other is known exactly
    angles = np.radians([0.0, 30.0, 100.0])
    vectors = np.stack([np.cos(angles), np.sin(angles)] + [np.zeros(3)] * 6, axis=1).astype(np.float32)

    class Fixed:  # vectors given directly; embed is not called when vectors are passed
        name, dim = "fixed", 8

    idx = build_shard_index(0, 1, ["a", "b", "c"], ["x", "y", "z"], [0, 0, 0], embedder=Fixed(),
                            vectors=vectors, knn_k=1)
    assert idx.knn_mean.tolist() == pytest.approx([math.cos(math.radians(30)), math.cos(math.radians(30)),
                                                   math.cos(math.radians(70))], abs=1e-6)
    # stored beside the index and read back
    (tmp_path / "v.parquet").write_bytes(b"")
    idx.save(tmp_path / "v.parquet")
    loaded = ShardIndex.load(tmp_path / "v.parquet")
    assert loaded.knn_k == 1 and loaded.knn_mean.tolist() == pytest.approx(idx.knn_mean.tolist())


def test_shared_spans_are_the_longest_common_word_runs() -> None:
    a = "Jesus answered and said unto him, Verily, verily, I say unto thee, Except a man be born again"
    b = "Jesus answered him, Most certainly I tell you, unless one is born anew; except a man be born again"
    assert shared_spans(a, b) == ["except a man be born again"]
    assert shared_spans("one two three", "four five six") == []


MARGIN = Thresholds(cosine_review=0.95, margin_review=1.3, margin_review_lower=1.5, margin_max_rank=2,
                    cosine_floor=0.5)


def test_top_neighbour_with_a_margin_goes_to_review_and_says_why() -> None:
    decision, reasons = MARGIN.decide_paraphrase(0.72, 1.45, 1, longest_span_words=4, jaccard=0.1)
    assert decision is Decision.REVIEW
    assert reasons[0] == "rank 1 neighbour with margin 1.450 >= 1.3"
    assert "shares a 4-word span" in reasons and "word-shingle Jaccard 0.100" in reasons


def test_lower_ranks_need_the_higher_margin_and_far_ranks_are_kept() -> None:
    assert MARGIN.decide_paraphrase(0.72, 1.45, 2)[0] is Decision.KEEP  # 1.45 < 1.5 at rank 2
    assert MARGIN.decide_paraphrase(0.72, 1.55, 2)[0] is Decision.REVIEW
    decision, reasons = MARGIN.decide_paraphrase(0.9, 2.0, 3)
    assert decision is Decision.KEEP and "rank 3 neighbour" in reasons[0]
    assert MARGIN.decide_paraphrase(0.45, 3.0, 1)[0] is Decision.KEEP  # under the cosine floor


def test_a_crowd_of_look_alikes_is_kept_whatever_the_cosine() -> None:
    # cosine 0.9 among records that are all at 0.9 (one template): margin 1, not a paraphrase
    assert MARGIN.decide_paraphrase(0.9, 1.0, 1)[0] is Decision.KEEP
    # the absolute cut still reviews on its own
    assert MARGIN.decide_paraphrase(0.96, 1.0, 1)[0] is Decision.REVIEW


def test_a_paraphrase_is_never_erased_from_a_sample() -> None:
    decision, reasons = MARGIN.decide_paraphrase(1.0, 3.0, 1, Provenance.SAMPLE)
    assert decision is Decision.REVIEW and "the same vector" in reasons[0]


def test_margin_rule_off_is_the_plain_cosine_rule() -> None:
    plain = Thresholds(cosine_review=0.75)
    assert plain.decide_paraphrase(0.7, 5.0, 1)[0] is Decision.KEEP
    assert plain.decide_paraphrase(0.8, 0.5, 9)[0] is Decision.REVIEW


def test_bad_margin_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="margin_max_rank"):
        Thresholds(margin_max_rank=-1)
    with pytest.raises(ValueError, match="cosine_floor"):
        Thresholds(cosine_floor=1.5)


def test_locate_reviews_the_standout_neighbour_and_keeps_the_crowd() -> None:
    """Through locate: a reworded text with an unremarkable cosine stands out of its sparse
    neighbourhood (review); a template text at a high cosine sits in a crowd (keep)."""
    crowd = [f"Order {n} was delivered late and the box was damaged, please refund order {n}" for n in range(40)]
    others = ["The library opens at nine on weekdays and at ten on Sundays",
              "Our choir meets every Thursday evening in the old chapel",
              "Fresh bread is baked every morning at the corner shop",
              "The quick brown fox jumped over the sleepy dog beside the river bank this morning"]
    texts = crowd + others
    ids = [f"r{i}" for i in range(len(texts))]
    embedder = HashingEmbedder()
    idx = build_shard_index(0, 1, ids, texts, np.zeros(len(ids), np.int32), embedder=embedder)
    fetch = dict(zip(ids, texts))
    thresholds = Thresholds(cosine_review=0.99, margin_review=1.3, margin_review_lower=1.6, margin_max_rank=1,
                            cosine_floor=0.3)

    def run(sample: str):
        return locate_matches(LocateRequest(samples=(sample,)), {0: idx}, lambda s, r: [fetch[x] for x in r],
                              embedder=embedder, thresholds=thresholds, hops=0, report_keep=True)

    para = run("A quick brown fox leapt over the sleepy dog by the river bank")
    top = [m for m in para.matches if m.paraphrase is not None and m.paraphrase.rank == 1][0]
    assert top.record_id == "r43" and top.decision is Decision.REVIEW
    ev = top.paraphrase
    assert ev.cosine < 0.9 and ev.margin >= 1.3 and "over the sleepy dog" in " ".join(ev.shared_spans)
    assert any("margin" in r for r in ev.reasons)
    as_json = top.to_dict()["paraphrase"]
    assert set(as_json) >= {"cosine", "margin", "rank", "shared_spans", "reasons", "jaccard"}
    # what a match row keeps: the numbers and one reason code per reason, no word of either text
    assert len(ev.reason_codes) == len(ev.reasons) and ev.reason_codes[0] == "margin_review"
    kept = ev.numbers()
    assert "shared_spans" not in kept and "reasons" not in kept and kept["longest_span_words"] >= 4
    assert not any(word in str(kept) for word in ("fox", "sleepy", "river"))

    templ = run("Order 977 was delivered late and the box was damaged, please refund order 977")
    emb = [m for m in templ.matches if m.paraphrase is not None]
    assert emb and all(m.decision is Decision.KEEP for m in emb)
    assert max(m.paraphrase.cosine for m in emb) > top.paraphrase.cosine  # higher cosine, still kept


LEAD = Thresholds(cosine_review=0.95, margin_review=1.25, margin_review_lower=1.25, margin_max_rank=1,
                  cosine_floor=0.5, lead_weight=2.0, margin_review_spans=1.1)


def test_a_clear_lead_over_the_runner_up_lifts_a_dense_neighbourhoods_top_match() -> None:
    # A verse among its chapter's verses: margin 1.15 (the neighbourhood is dense), but 0.08 ahead of rank 2.
    decision, reasons = LEAD.decide_paraphrase(0.7, 1.15, 1, lead=0.08)
    assert decision is Decision.REVIEW
    assert reasons[0] == "rank 1 neighbour with score 1.310 (margin 1.150 + 2 x lead 0.080) >= 1.25"
    # the same margin with the runner-up close behind (or the margin rule alone) keeps it
    assert LEAD.decide_paraphrase(0.7, 1.15, 1, lead=0.01)[0] is Decision.KEEP
    assert LEAD.with_changes(lead_weight=0.0).decide_paraphrase(0.7, 1.15, 1, lead=0.08)[0] is Decision.KEEP
    # the lead is the top match's: a lower rank gets no bonus from it
    assert LEAD.with_changes(margin_max_rank=2).decide_paraphrase(0.7, 1.15, 2, lead=0.08)[0] is Decision.KEEP
    assert paraphrase_score(1.15, 1, 0.08, 2.0) == pytest.approx(1.31)
    assert paraphrase_score(1.15, 2, 0.08, 2.0) == pytest.approx(1.15)


def test_a_shared_span_lowers_the_bar_and_its_absence_does_not_raise_it() -> None:
    # score 1.15 is below 1.25; with a 4-word span shared, 1.1 suffices
    decision, reasons = LEAD.decide_paraphrase(0.7, 1.15, 1, longest_span_words=4, lead=0.0)
    assert decision is Decision.REVIEW and "shared 4-word span" in reasons[0]
    assert LEAD.decide_paraphrase(0.7, 1.15, 1, longest_span_words=2, lead=0.0)[0] is Decision.KEEP
    assert LEAD.decide_paraphrase(0.7, 1.05, 1, longest_span_words=6, lead=0.0)[0] is Decision.KEEP
    # without any shared words the embedding score alone decides, at the same bar
    assert LEAD.decide_paraphrase(0.7, 1.26, 1, lead=0.0)[0] is Decision.REVIEW
    # the span tier is the top match's only, and off at 0
    assert LEAD.with_changes(margin_max_rank=2).decide_paraphrase(0.7, 1.15, 2, longest_span_words=6)[0] \
        is Decision.KEEP
    assert LEAD.with_changes(margin_review_spans=0.0).decide_paraphrase(
        0.7, 1.15, 1, longest_span_words=6)[0] is Decision.KEEP


def test_lead_over_the_runner_up() -> None:
    assert lead_over_runner_up(np.array([0.8, 0.7, 0.2])) == pytest.approx(0.1)
    assert lead_over_runner_up(np.array([0.8, 0.8, 0.2])) == 0.0  # tied copies: no lead
    assert lead_over_runner_up(np.array([0.8])) == 0.0 and lead_over_runner_up(np.array([])) == 0.0
    assert lead_over_runner_up(np.array([0.8, np.nan])) == 0.0


def test_bad_lead_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="lead_weight"):
        Thresholds(lead_weight=-1.0)
    with pytest.raises(ValueError, match="span_review_words"):
        Thresholds(span_review_words=0)


def test_locate_reports_the_lead_and_reviews_by_it() -> None:
    """Through locate: the rank-1 record's lead over the runner-up is measured over all shards, recorded
    as evidence, and lifts a match that the margin alone would keep."""
    others = ["The library opens at nine on weekdays and at ten on Sundays",
              "Our choir meets every Thursday evening in the old chapel",
              "Fresh bread is baked every morning at the corner shop",
              "The quick brown fox jumped over the sleepy dog beside the river bank this morning",
              "A slow red fox walked past the sleepy cat near the river this evening"]
    embedder = HashingEmbedder()
    ids = [f"r{i}" for i in range(len(others))]
    indexes = {s: build_shard_index(s, 1, ids[s::2], others[s::2], np.zeros(len(ids[s::2]), np.int32),
                                    embedder=embedder, knn_k=2) for s in (0, 1)}
    fetch = dict(zip(ids, others))
    sample = "A quick brown fox leapt over the sleepy dog by the river bank"

    def run(thresholds: Thresholds):
        res = locate_matches(LocateRequest(samples=(sample,)), indexes, lambda s, r: [fetch[x] for x in r],
                             embedder=embedder, thresholds=thresholds, hops=0, report_keep=True)
        return {m.paraphrase.rank: m for m in res.matches if m.paraphrase is not None}

    by_margin = Thresholds(cosine_review=0.99, margin_review=50.0, margin_review_lower=50.0, margin_max_rank=2,
                           cosine_floor=0.1)
    found = run(by_margin)
    top, second = found[1], found[2]
    assert top.record_id == "r3" and top.decision is Decision.KEEP  # the margin alone: not enough
    lead = top.paraphrase.cosine - second.paraphrase.cosine
    assert top.paraphrase.lead == pytest.approx(lead) and lead > 0.1 and second.paraphrase.lead == 0.0
    needed = top.paraphrase.margin + 100.0 * lead  # margin + weight x lead, with weight 100
    lifted = run(by_margin.with_changes(margin_review=needed - 1e-4, margin_review_lower=needed - 1e-4,
                                        lead_weight=100.0))
    assert lifted[1].record_id == "r3" and lifted[1].decision is Decision.REVIEW
    assert lifted[2].decision is Decision.KEEP  # rank 2: its margin alone, far below
    lifted = lifted[1]
    assert lifted.paraphrase.score == pytest.approx(top.paraphrase.margin + 100.0 * lead)
    assert {"lead", "score"} <= set(lifted.to_dict()["paraphrase"])


def test_a_paraphrase_of_the_subjects_own_record_is_the_second_hops_nearest_neighbour() -> None:
    """From the second hop the query is the subject's own record: it is not its own neighbour, so a
    paraphrase of it is rank 1 (before, the record itself took rank 1 and the paraphrase was kept)."""
    own = "The quick brown fox jumped over the sleepy dog beside the river bank this morning"
    texts = [own, "A quick brown fox leapt over the sleepy dog by the river bank",
             "The library opens at nine on weekdays and at ten on Sundays",
             "Our choir meets every Thursday evening in the old chapel",
             "Fresh bread is baked every morning at the corner shop"]
    ids = [f"r{i}" for i in range(len(texts))]
    embedder = HashingEmbedder()
    idx = build_shard_index(0, 1, ids, texts, np.zeros(len(ids), np.int32), embedder=embedder, knn_k=2)
    fetch = dict(zip(ids, texts))
    thresholds = Thresholds(cosine_review=0.99, margin_review=1.3, margin_review_lower=50.0, margin_max_rank=1,
                            cosine_floor=0.3)
    result = locate_matches(LocateRequest(), {0: idx}, lambda s, r: [fetch[x] for x in r],
                            seeds=[SeedRecord(0, "r0", "email")], embedder=embedder, thresholds=thresholds, hops=1)
    found = {m.record_id: m for m in result.matches}
    assert found["r0"].decision is Decision.ERASE
    para = found["r1"]
    assert para.paraphrase.rank == 1 and para.decision is Decision.REVIEW
    assert para.paraphrase.query_knn_mean < 0.9  # the query's own cosine of 1 is not in its neighbourhood
