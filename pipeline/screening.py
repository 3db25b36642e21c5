"""Screening texts (e.g. model outputs) against a dataset's tombstones.

The tombstones are the MinHash signatures of erased records
(``pipeline.locate.tombstone_path``). A text whose estimated Jaccard similarity
with a tombstone reaches ``min_jaccard`` is reported as matching erased content.
This is an aid for output filtering, not a guarantee: the estimates have a
standard error (about 0.035 at J = 0.8 with 128 permutations) and MinHash does
not see paraphrases.

The screened texts are only turned into signatures in memory: they are never
stored, logged, or returned.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine

from db.lineage import get_dataset
from db.session import unit_of_work
from db.settings import Settings
from dedup.tombstones import DEFAULT_SCREEN_JACCARD, TombstoneSet
from pipeline.database import open_database
from pipeline.locate import tombstone_path

MAX_SCREEN_TEXTS = 100
MAX_SCREEN_TEXT_CHARS = 20_000
MAX_KEYS_PER_TEXT = 5
SCREEN_NOTE = (
    "This is an aid for output filtering based on MinHash estimates of the similarity to erased records; "
    "it is not a guarantee that a text does or does not contain erased content."
)


class UnknownDataset(LookupError):
    """No dataset of that name."""


@dataclass(frozen=True)
class TextScreen:
    index: int
    matches_erased_content: bool
    best_estimated_jaccard: float | None
    tombstone_keys: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ScreenResult:
    dataset: str
    results: list[TextScreen]
    tombstones: int
    note: str = SCREEN_NOTE


_cache_lock = threading.Lock()
_cache: dict[Path, tuple[tuple[int, int, int], TombstoneSet]] = {}


def _tombstones(settings: Settings, dataset: str) -> TombstoneSet | None:
    """The dataset's tombstones, cached per file while it is unchanged (the LSH
    bands built on the set are cached with it)."""
    path = tombstone_path(settings, dataset)
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    with _cache_lock:
        cached = _cache.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
    tombstones = TombstoneSet.load(path)  # a file is replaced atomically, never rewritten in place
    with _cache_lock:
        _cache[path] = (stamp, tombstones)
    return tombstones


def screen_texts(
    settings: Settings,
    dataset: str,
    texts: Sequence[str],
    min_jaccard: float = DEFAULT_SCREEN_JACCARD,
    *,
    engine: Engine | None = None,
) -> ScreenResult:
    """One result per text, in order: does it match a tombstone of ``dataset``
    (estimated Jaccard >= ``min_jaccard``), the best estimate and up to five
    tombstone keys, best first. ``UnknownDataset`` if there is no such dataset;
    a dataset without tombstones matches nothing."""
    if isinstance(texts, str):
        raise ValueError("screen_texts takes a sequence of texts; wrap a single text in a list")
    if not 0.0 < min_jaccard < 1.0:
        raise ValueError(f"min_jaccard must be in (0, 1), got {min_jaccard}")
    engine = engine if engine is not None else open_database(settings)
    with unit_of_work(engine) as session:
        if get_dataset(session, dataset) is None:
            raise UnknownDataset(f"no dataset named {dataset!r}")
    tombstones = _tombstones(settings, dataset)
    best: dict[int, float] = {}
    keys: dict[int, list[str]] = {}
    if tombstones is not None and len(tombstones) and texts:
        for hit in tombstones.screen(list(texts), min_jaccard):  # best first per text
            best[hit.text_index] = max(best.get(hit.text_index, 0.0), float(hit.estimated_jaccard))
            seen = keys.setdefault(hit.text_index, [])
            if hit.key not in seen and len(seen) < MAX_KEYS_PER_TEXT:
                seen.append(hit.key)
    results = [
        TextScreen(i, i in best, round(best[i], 4) if i in best else None, keys.get(i, []))
        for i in range(len(texts))
    ]
    return ScreenResult(dataset, results, len(tombstones) if tombstones is not None else 0)
