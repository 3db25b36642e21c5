"""A request cannot be used to erase someone else (issue 10, point 6a): a match
reached only from a requester-supplied sample goes to review, whatever its
Jaccard, unless the policy says ``score``; matches reached from the subject's
identifier seeds or their second hop are decided by score as before."""

from __future__ import annotations

import pytest

from dedup.locate import LocateRequest, SeedRecord, locate_matches
from dedup.policy import Decision, Provenance, SampleOnly, Thresholds
from dedup.shard_index import build_shard_index

JANE = "I bought the blue kettle in March and the lid cracked after two weeks of daily use at home"
JANE_COPY = "I bought the blue kettle in March and the lid cracked after two weeks of daily use at home"
BOB = "my neighbour Bob wrote that the train to Leeds was late again on Monday and he missed the meeting"
BOB_NEAR = "my neighbour Bob wrote that the train to Leeds was late again on Monday and he missed the meeting today"
CAROL = "Carol says the recipe needs less sugar and a hotter oven for the crust to brown properly at all"
RECORDS = {
    (0, "jane-1"): JANE,  # carries Jane's email: a seed
    (1, "copy-1"): JANE_COPY,  # an exact copy of Jane's post, reposted without her email
    (1, "bob-1"): BOB,  # someone else's post that the requester sends as a "sample"
    (0, "bob-2"): BOB_NEAR,  # a near-copy of Bob's post
    (1, "carol-1"): CAROL,
}


@pytest.fixture(scope="module")
def indexes() -> dict:
    out = {}
    for shard in (0, 1):
        ids = [rid for s, rid in RECORDS if s == shard]
        out[shard] = build_shard_index(shard, 1, ids, [RECORDS[(shard, rid)] for rid in ids], [0] * len(ids))
    return out


def fetch(shard: int, record_ids) -> list[str]:  # noqa: ANN001
    return [RECORDS[(shard, rid)] for rid in record_ids]


def locate(indexes: dict, samples: tuple[str, ...], **kw):  # noqa: ANN003
    seeds = [SeedRecord(0, "jane-1", "email")]
    result = locate_matches(LocateRequest(samples=samples), indexes, fetch, seeds=seeds, **kw)
    return {m.record_id: m for m in result.matches}, result


def test_a_sample_only_exact_copy_goes_to_review_by_default(indexes: dict) -> None:
    found, result = locate(indexes, (BOB,))
    bob = found["bob-1"]
    assert bob.score == pytest.approx(1.0) and bob.provenance is Provenance.SAMPLE
    assert bob.decision is Decision.REVIEW  # J = 1.0, but only the requester says it is theirs
    assert found["bob-2"].provenance is Provenance.SAMPLE and found["bob-2"].decision is Decision.REVIEW
    # The subject's own records and their copies are decided by score as before.
    assert found["jane-1"].provenance is Provenance.SEED and found["jane-1"].decision is Decision.ERASE
    assert found["copy-1"].provenance is Provenance.SECOND_HOP and found["copy-1"].decision is Decision.ERASE
    assert result.thresholds.sample_only is SampleOnly.REVIEW
    assert result.to_dict()["thresholds"]["sample_only"] == "review"
    assert bob.to_dict()["provenance"] == "sample"


def test_the_score_policy_decides_sample_only_matches_by_score(indexes: dict) -> None:
    found, result = locate(indexes, (BOB,), sample_only="score")
    assert found["bob-1"].decision is Decision.ERASE and found["bob-1"].provenance is Provenance.SAMPLE
    # found from the text of a sample-only record: still sample provenance
    assert found["bob-2"].provenance is Provenance.SAMPLE and found["bob-2"].decision is Decision.ERASE
    assert result.to_dict()["thresholds"]["sample_only"] == "score"
    same, _ = locate(indexes, (BOB,), thresholds=Thresholds(sample_only="score"))
    assert same["bob-1"].decision is Decision.ERASE


def test_a_sample_equal_to_the_subjects_own_text_is_not_sample_only(indexes: dict) -> None:
    """The subject's text, sent also as a sample: its copies are reached from the seed too."""
    found, _ = locate(indexes, (JANE,))
    assert found["copy-1"].decision is Decision.ERASE
    assert found["copy-1"].provenance is Provenance.SECOND_HOP


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="sample_only is one of review, score"):
        Thresholds(sample_only="erase")
