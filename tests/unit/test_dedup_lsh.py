"""Band/row choice and the band index, checked against datasketch's MinHashLSH."""

from __future__ import annotations

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH

from dedup.lsh import BandIndex, LSHParams, candidate_probability, choose_params
from dedup.minhash import minhash_signatures


def test_choice_meets_the_recall_target_and_beats_the_default():
    params = choose_params(0.8, 128, max_miss=1e-4)
    assert params.width <= 128
    assert 1 - candidate_probability(0.8, params.bands, params.rows) <= 1e-4
    # datasketch's default weights give 9 x 13 here: a candidate probability of ~0.40 at J = 0.8.
    assert candidate_probability(0.8, 9, 13) == pytest.approx(0.40, abs=0.01)
    # a stricter target needs more bands per row
    strict = choose_params(0.8, 128, max_miss=1e-8)
    assert 1 - candidate_probability(0.8, strict.bands, strict.rows) <= 1e-8


def test_impossible_targets_say_what_to_change():
    with pytest.raises(ValueError, match="more permutations"):
        choose_params(0.3, 16, max_miss=1e-9)
    with pytest.raises(ValueError, match="threshold"):
        choose_params(1.5)
    with pytest.raises(ValueError):
        LSHParams(0, 4)


def _texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(3000)]
    base = [" ".join(rng.choice(vocab, 200)) for _ in range(n)]
    edited = []
    for text in base[: n // 3]:  # near-copies (J ~ 0.9) with two words replaced
        ws = text.split()
        for i in rng.choice(len(ws), 2, replace=False):
            ws[i] = "edit"
        edited.append(" ".join(ws))
    return base + edited


def test_candidates_equal_datasketch_minhashlsh_with_the_same_bands():
    texts = _texts(150, 1)
    sigs = minhash_signatures(texts)
    params = choose_params(0.8, 128)
    ours = BandIndex.build(sigs, params)
    lsh = MinHashLSH(num_perm=128, params=(params.bands, params.rows))
    for i, s in enumerate(sigs):
        lsh.insert(i, MinHash(num_perm=128, hashvalues=s, scheme="affine32"))
    for i, cand in enumerate(ours.candidates(sigs)):
        expected = sorted(lsh.query(MinHash(num_perm=128, hashvalues=sigs[i], scheme="affine32")))
        assert cand.tolist() == expected


def test_near_copies_are_candidates_and_removal_renumbers():
    texts = _texts(90, 2)
    sigs = minhash_signatures(texts)
    index = BandIndex.build(sigs, choose_params())
    cands = index.candidates(sigs[90:])
    for j, rows in enumerate(cands):  # copy 90 + j of text j
        assert j in rows.tolist() and 90 + j in rows.tolist()
    smaller = index.without([0, 5])
    assert smaller.n_rows == len(texts) - 2
    after = smaller.candidates(sigs[90:92])
    assert 90 - 1 not in after[0].tolist()  # text 0 is gone; its copy (row 90, now 88) is still there
    assert 88 in after[0].tolist() and 0 in after[1].tolist()  # text 1 is row 0 now


def test_empty_signatures_match_nothing():
    sigs = minhash_signatures(["", "!!!", "some words here and there"])
    index = BandIndex.build(sigs, choose_params())
    got = index.candidates(sigs)
    assert got[0].size == 0 and got[1].size == 0 and got[2].tolist() == [2]
    assert index.candidates(np.zeros((0, 128), np.uint32)) == []
