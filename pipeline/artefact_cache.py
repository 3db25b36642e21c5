"""One in-process cache for artefacts loaded from files (shard indexes, tombstones).

A long-lived process (a Prefect worker, the API) asks for an artefact on every
request; reading it from disk each time dominates a locate. An entry is kept
under a key with a *stamp*: what identifies the version it was loaded from (the
shard version, the file's inode, size and mtime, the MinHash key). A lookup with
another stamp reloads and replaces the entry, so a superseded version is never
served: the caller takes the current version from the database on every call,
and an erasure writes a new version under a new path (an index rebuilt in place
is a new directory, hence a new inode).

Bounded memory: least recently used entries are dropped once the estimated
bytes exceed the bound (``ERASURE_ARTEFACT_CACHE_MB``, default 4096; 0 disables
caching). A shard index takes about 2.2 KB per record (signatures, vectors, bands, ids and
their row map), so the default holds the indexes of about 1.8M records; past the bound the
shards' indexes evict each other and every locate reads them again (about 15x slower at 1M
records), which is logged once per process as a warning naming the setting. Thread-safe; two threads missing the same key both load it (the
later store wins), which costs time, never correctness.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

DEFAULT_MAX_MB = 4096
_log = logging.getLogger(__name__)


def estimated_bytes(value: Any, depth: int = 3) -> int:
    """Memory held by an artefact: its numpy arrays, FAISS index, dicts and record-id strings, estimated."""
    if isinstance(value, np.ndarray):
        # record ids are str objects: ~50 bytes each plus their characters
        return value.nbytes + (value.size * 80 if value.dtype == object else 0)
    if isinstance(value, dict):
        return len(value) * 120
    if isinstance(value, (tuple, list)):
        return len(value) * 80
    if isinstance(getattr(value, "serialized_size", None), int):  # a Parquet footer, parsed: a few times its bytes
        return value.serialized_size * 4
    if depth == 0 or not hasattr(value, "__dict__") or isinstance(value, type):
        return 0
    total = sum(estimated_bytes(attr, depth - 1) for attr in vars(value).values())
    ntotal, dim = getattr(value, "ntotal", None), getattr(value, "dim", None)
    if isinstance(ntotal, int) and isinstance(dim, int):  # a VectorIndex: float32 vectors plus ids
        total += ntotal * (dim * 4 + 8)
    return total


class ArtefactCache:
    """LRU of ``key -> (stamp, value)``, bounded by the values' estimated bytes."""

    def __init__(self, max_bytes: int, sizeof: Callable[[Any], int] = estimated_bytes) -> None:
        self.max_bytes = max_bytes
        self._sizeof = sizeof
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, tuple[Hashable, Any, int]] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0
        self.evictions = 0

    def get(self, key: Hashable, stamp: Hashable, load: Callable[[], Any]) -> Any:
        """The value cached under ``key`` if it was loaded with ``stamp``; else ``load()``, stored."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] == stamp:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[1]
            if entry is not None:  # superseded: drop it now, not when the load below finishes
                self._drop(key)
            self.misses += 1
        value = load()
        size = self._sizeof(value) if value is not None else 0
        with self._lock:
            if key in self._entries:
                self._drop(key)
            if size <= self.max_bytes:
                self._entries[key] = (stamp, value, size)
                self._bytes += size
                while self._bytes > self.max_bytes:
                    self._drop(next(iter(self._entries)))
                    self.evictions += 1
                    if self.evictions == 1:
                        _log.warning("the artefact cache is full (%d MiB): entries now evict each other and are "
                                     "read from disk again; raise ERASURE_ARTEFACT_CACHE_MB (about 2.2 KB per "
                                     "record of the datasets this process locates in)", self.max_bytes >> 20)
            elif self.max_bytes:
                _log.warning("an artefact of %d MiB is larger than the whole cache (%d MiB) and is not kept; "
                             "raise ERASURE_ARTEFACT_CACHE_MB", size >> 20, self.max_bytes >> 20)
        return value

    def discard(self, key: Hashable) -> None:
        with self._lock:
            if key in self._entries:
                self._drop(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, key: Hashable) -> None:
        self._bytes -= self._entries.pop(key)[2]


def _max_bytes_from_env() -> int:
    raw = os.environ.get("ERASURE_ARTEFACT_CACHE_MB", str(DEFAULT_MAX_MB))
    try:
        mb = int(raw)
    except ValueError:
        raise ValueError(f"ERASURE_ARTEFACT_CACHE_MB must be a whole number of MiB, got {raw!r}") from None
    if mb < 0:
        raise ValueError(f"ERASURE_ARTEFACT_CACHE_MB must be >= 0, got {mb}")
    return mb << 20


# The process's one cache: shard indexes and tombstones share the bound.
ARTEFACTS = ArtefactCache(_max_bytes_from_env())
