"""Normalisation, the vectorised XXH32 and MinHash signatures against their references."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash
from datasketch import MinHash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedup.minhash import (
    EMPTY_VALUE,
    MinHashParams,
    datasketch_minhash,
    estimate_jaccard,
    minhash_signatures,
    shingle_hash,
)
from dedup.normalize import exact_jaccard, shingle_set, shingles, tokenize_batch, words
from dedup.span_hash import xxh32_spans
from shards.demo_data import generate_demo

# Unicode text with the characters that make normalisation interesting.
_ALPHABET = st.sampled_from(
    list("abcXYZ019 _-.,!?'\t\n") + ["é", "É", "ß", "ẞ", "ﬁ", "Ⅻ", "½", "—", "’", "\u00a0", "\u0301",
                                     "İ", "σ", "ς", "日本", "😀", "\u200b", "Å", "Ω"])
_TEXT = st.lists(_ALPHABET, max_size=60).map("".join)


@pytest.fixture(scope="module")
def demo_small():
    return generate_demo(1000, seed=3)


def test_reference_normalisation():
    assert words("Hello, WORLD!  It's 2024_05 — Straße ﬁne") == ["hello", "world", "it", "s", "2024", "05",
                                                                  "strasse", "fine"]
    assert shingles("a b c", 5) == ["a b c"]
    assert shingles("", 5) == [] and shingles("!!!", 5) == []
    assert shingles("one two three four five six", 5) == ["one two three four five", "two three four five six"]
    assert exact_jaccard(shingle_set("a b c d e f"), shingle_set("A, B. c d e f")) == 1.0
    assert exact_jaccard(frozenset(), frozenset()) == 0.0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_TEXT, max_size=8), st.integers(1, 6))
def test_batch_tokenizer_finds_the_reference_words(texts, k):
    batch = tokenize_batch(texts)
    for d, text in enumerate(texts):
        assert batch.words_of(d) == words(text)
    for d, text in enumerate(texts):  # and the shingle hashes follow the reference shingles
        expected = [shingle_hash(s.encode()) for s in shingles(text, k)]
        sig = minhash_signatures([text], MinHashParams(num_perm=16, shingle_size=k))[0]
        ref = MinHash(num_perm=16, seed=1, hashfunc=shingle_hash)
        ref.update_batch([s.encode() for s in shingles(text, k)])
        assert np.array_equal(sig, ref.hashvalues), (text, expected)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300), st.lists(st.tuples(st.integers(0, 300), st.integers(0, 120)), max_size=40),
       st.integers(0, 2**32 - 1))
def test_span_hash_is_xxh32(data, spans, seed):
    buf = np.frombuffer(data, dtype=np.uint8)
    starts = [min(a, len(data)) for a, _ in spans]
    stops = [min(a + n, len(data)) for a, n in zip(starts, (n for _, n in spans))]
    got = xxh32_spans(buf, np.array(starts, dtype=np.int64), np.array(stops, dtype=np.int64), seed)
    assert got.tolist() == [xxhash.xxh32_intdigest(data[a:b], seed=seed) for a, b in zip(starts, stops)]


def test_signatures_equal_datasketch_built_the_ordinary_way(demo_small):
    texts = [r["text"] for r in demo_small.records[:300]] + ["", "...", "one", "Ünïcödé text — with ß"]
    params = MinHashParams()
    ours = minhash_signatures(texts, params, batch_size=64, workers=2)
    assert ours.dtype == np.uint32 and ours.shape == (len(texts), 128)
    for text, sig in zip(texts, ours):
        assert np.array_equal(sig, datasketch_minhash(text, params).hashvalues)
    # and through datasketch's own bulk constructor
    bulk = MinHash.bulk([[s.encode() for s in shingles(t)] for t in texts[:50]], num_perm=128, seed=1,
                        hashfunc=shingle_hash)
    assert all(np.array_equal(m.hashvalues, s) for m, s in zip(bulk, ours[:50]))
    assert np.all(ours[len(texts) - 4 + 1] == EMPTY_VALUE)  # "..." has no words


def test_other_parameters_stay_compatible():
    text = "the quick brown fox jumps over the lazy dog again and again"
    params = MinHashParams(num_perm=64, seed=7, shingle_size=3, hash_seed=99)
    assert np.array_equal(minhash_signatures([text], params)[0], datasketch_minhash(text, params).hashvalues)
    assert MinHashParams.from_dict(params.to_dict()) == params


def test_estimate_tracks_exact_jaccard():
    base = " ".join(f"w{i}" for i in range(400))
    edited = base.replace("w100 ", "x ").replace("w300 ", "y ")
    sig = minhash_signatures([base, edited])
    exact = exact_jaccard(shingle_set(base), shingle_set(edited))
    assert abs(estimate_jaccard(sig[0], sig[1:])[0] - exact) < 0.12


def test_bad_parameters_say_what_to_do():
    with pytest.raises(ValueError, match="num_perm"):
        MinHashParams(num_perm=3)
    with pytest.raises(ValueError, match="shingle_size"):
        MinHashParams(shingle_size=0)
    with pytest.raises(ValueError, match="wrap it in a list"):
        minhash_signatures("one text")
    with pytest.raises(ValueError, match="rebuild"):
        MinHashParams.from_dict({**MinHashParams().to_dict(), "hash": "sha1"})


# ---------------------------------------------------------------- keyed parameters (issue 10, point 1)

KEY_A = b"dataset-a-minhash-key-0123456789"
KEY_B = b"dataset-b-minhash-key-0123456789"


def test_keyed_signatures_equal_datasketch_with_the_keyed_permutations_and_hash(demo_small):
    """datasketch 2.0.0, given the keyed (a, b) and the keyed word hash, builds the same signature."""
    import datasketch

    assert datasketch.__version__ == "2.0.0"
    texts = [r["text"] for r in demo_small.records[:200]] + ["", "one", "Ünïcödé text — with ß"]
    params = MinHashParams.keyed(KEY_A)
    a, b = params.permutations()
    ours = minhash_signatures(texts, params, batch_size=64, workers=2)
    for text, sig in zip(texts, ours):
        m = MinHash(num_perm=128, scheme="affine32", permutations=(a, b),
                    hashfunc=lambda s: shingle_hash(s, params.word_seed))
        m.update_batch([s.encode("utf-8") for s in shingles(text)])
        assert np.array_equal(sig, m.hashvalues)
        assert np.array_equal(sig, datasketch_minhash(text, params).hashvalues)
    # the keyed parameters are neither datasketch's seeded ones nor the unkeyed word hash
    seeded_a, _ = MinHashParams().permutations()
    assert not np.array_equal(a, seeded_a) and params.word_seed != 0 and np.all(a & 1)


def test_the_same_text_under_two_keys_gives_unrelated_signatures(demo_small):
    texts = [r["text"] for r in demo_small.records[:100] if len(r["text"].split()) >= 12]
    under_a = minhash_signatures(texts, MinHashParams.keyed(KEY_A))
    under_b = minhash_signatures(texts, MinHashParams.keyed(KEY_B))
    unkeyed = minhash_signatures(texts, MinHashParams())
    for i in range(len(texts)):
        assert estimate_jaccard(under_a[i], under_a[i:i + 1])[0] == 1.0
        assert estimate_jaccard(under_a[i], under_b[i:i + 1])[0] < 0.05  # chance agreement only
        assert estimate_jaccard(under_a[i], unkeyed[i:i + 1])[0] < 0.05


def test_without_the_key_a_guessed_text_does_not_confirm_a_stored_signature(demo_small):
    """Someone holding a stored (keyed) signature and the exact text cannot confirm it: every
    parameter set they can compute without the key (seeded, other keys) gives unrelated values."""
    text = next(r["text"] for r in demo_small.records if len(r["text"].split()) >= 12)
    stored = minhash_signatures([text], MinHashParams.keyed(KEY_A))[0]
    guesses = [MinHashParams(seed=s, hash_seed=h) for s in (0, 1, 2, 42) for h in (0, 1)]
    guesses += [MinHashParams.keyed(bytes([i]) * 32) for i in range(8)]
    for params in guesses:
        assert estimate_jaccard(stored, minhash_signatures([text], params))[0] < 0.05
    # the key holder confirms it
    assert estimate_jaccard(stored, minhash_signatures([text], MinHashParams.keyed(KEY_A)))[0] == 1.0


def test_keyed_parameters_never_store_the_key_and_need_it_back():
    params = MinHashParams.keyed(KEY_A, num_perm=64)
    stored = params.to_dict()
    assert KEY_A.decode() not in repr(params) and KEY_A.decode() not in str(stored)
    assert set(stored) >= {"key_id"} and stored["seed"] == 0 and stored["hash_seed"] == 0
    loaded = MinHashParams.from_dict(stored)
    assert loaded == params and loaded.key is None
    with pytest.raises(ValueError, match="hold no key"):
        minhash_signatures(["some text to hash here"], loaded)
    with pytest.raises(ValueError, match="restore the original secret key"):
        loaded.with_key(KEY_B)
    text = "the quick brown fox jumps over the lazy dog again and again"
    assert np.array_equal(minhash_signatures([text], loaded.with_key(KEY_A)), minhash_signatures([text], params))
    assert MinHashParams.keyed(KEY_B, num_perm=64) != params and MinHashParams(num_perm=64) != params
    with pytest.raises(ValueError, match="16 bytes"):
        MinHashParams.keyed(b"short")
