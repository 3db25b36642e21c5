"""Deterministic placement of records into S shards and R slices.

A record's place depends only on its id and the dataset's seed, never on file
order, so re-ingesting or appending data never moves a record:

    h = xxh3_128(seed ":" record_id)
    shard = (h >> 64) mod S,   slice = (h >> 96) mod R,   order_key = (h mod 2^64) >> 1

Within a shard rows are kept in training order: by slice, then order key, then
id. Removing a record therefore leaves every other record's position in its
slice unchanged, which is what makes exact SISA retraining possible.
"""

from __future__ import annotations

from dataclasses import dataclass

import xxhash

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Placement:
    shard: int
    slice: int
    order_key: int  # fits a signed 64-bit integer


def place_record(record_id: str, seed: int, n_shards: int, n_slices: int) -> Placement:
    h = xxhash.xxh3_128_intdigest(f"{seed}:{record_id}".encode())
    high, low = h >> 64, h & _MASK64
    return Placement(shard=high % n_shards, slice=(high >> 32) % n_slices, order_key=low >> 1)


def validate_layout(n_shards: int, n_slices: int) -> None:
    if not 1 <= n_shards <= 4096:
        raise ValueError(f"--shards must be between 1 and 4096, got {n_shards}")
    if not 1 <= n_slices <= 1024:
        raise ValueError(f"--slices must be between 1 and 1024, got {n_slices}")
