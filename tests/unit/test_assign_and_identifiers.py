from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dedup.identifiers import key_id, keyed_hash, normalize_identifier
from shards.assign import place_record, validate_layout


@given(st.text(min_size=1, max_size=40), st.integers(0, 2**31), st.integers(1, 64), st.integers(1, 16))
def test_placement_is_deterministic_and_in_range(record_id: str, seed: int, shards: int, slices: int) -> None:
    first = place_record(record_id, seed, shards, slices)
    assert first == place_record(record_id, seed, shards, slices)
    assert 0 <= first.shard < shards and 0 <= first.slice < slices and 0 <= first.order_key < 2**63


def test_placement_is_balanced_and_depends_on_seed() -> None:
    ids = [f"r{i}" for i in range(8000)]
    shards = Counter(place_record(r, 0, 8, 4).shard for r in ids)
    slices = Counter(place_record(r, 0, 8, 4).slice for r in ids)
    assert min(shards.values()) > 850 and min(slices.values()) > 1800
    moved = sum(place_record(r, 0, 8, 4).shard != place_record(r, 1, 8, 4).shard for r in ids)
    assert moved > 6000


def test_layout_bounds() -> None:
    with pytest.raises(ValueError, match="--shards"):
        validate_layout(0, 4)
    with pytest.raises(ValueError, match="--slices"):
        validate_layout(4, 0)


def test_identifier_normalisation() -> None:
    assert normalize_identifier("email", " Jane.Doe@Example.COM ") == "jane.doe@example.com"
    assert normalize_identifier("phone", "+49 (30) 1234-567") == normalize_identifier("phone", "0049 30 1234567")
    assert normalize_identifier("name", "Ｊａｎｅ  DOE") == "jane doe"  # NFKC + casefold + spaces
    with pytest.raises(ValueError, match="unknown identifier kind 'ssn'"):
        normalize_identifier("ssn", "123")
    with pytest.raises(ValueError, match="not an email"):
        normalize_identifier("email", "jane")


def test_keyed_hash_depends_on_key_and_kind() -> None:
    key = b"k" * 32
    assert keyed_hash(key, "email", "A@B.C") == keyed_hash(key, "email", "a@b.c")
    assert keyed_hash(key, "email", "a@b.c") != keyed_hash(b"other-key-123456", "email", "a@b.c")
    assert keyed_hash(key, "user_id", "42") != keyed_hash(key, "name", "42")
    assert len(key_id(key)) == 16 and key_id(key) != key_id(b"x" * 32)
