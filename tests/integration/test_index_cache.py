"""The process's cache of shard indexes (pipeline.artefact_cache): a locate after an
erasure never finds an erased record through the cached index of a superseded version,
on both backends; the cache is bounded by bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from api.demo import DEMO_FIELDS
from db.session import unit_of_work
from db.settings import Settings
from dedup.locate import LocateRequest
from pipeline.artefact_cache import ARTEFACTS, ArtefactCache
from pipeline.database import open_database
from pipeline.erasure import erase_from_shard, locate_for_request, record_matches, shards_to_erase
from pipeline.ingest import IngestOptions, ingest_source_file
from pipeline.lifecycle import submit_request
from pipeline.locate import current_indexes, locate_dry_run
from db.lineage import get_dataset
from shards.demo_data import read_ground_truth, write_demo


def test_locate_after_an_erasure_does_not_use_the_superseded_cached_index(settings: Settings, tmp_path: Path) -> None:
    files = write_demo(tmp_path / "demo", 1500, seed=5)
    person = next(p for p in read_ground_truth(files.ground_truth)["persons"] if p["originals"])
    rows = {r["id"]: r for r in map(json.loads, files.records.read_text().splitlines())}
    ingest_source_file(files.records, IngestOptions(dataset="demo", fields=DEMO_FIELDS, n_shards=3), settings)
    engine = open_database(settings)
    original = person["originals"][0]
    probe = LocateRequest.parse(samples=[rows[original]["text"]])

    ARTEFACTS.clear()
    with unit_of_work(engine) as session:  # warms the cache with every shard's current index
        found = {m.record_id for m in locate_dry_run(settings, session, "demo", probe, hops=0).matches}
    assert original in found
    with unit_of_work(engine) as session:
        cached_before = current_indexes(settings, session, get_dataset(session, "demo"))[0]

    submission = submit_request(engine, settings.secret_key_bytes(), idempotency_key="cache-test-1",
                                identifiers=[("email", person["email"])], samples=[], actor="test")
    request_id = str(submission.request_id)
    with unit_of_work(engine) as session:
        result = locate_for_request(settings, session, request_id, "demo")
        record_matches(session, request_id, get_dataset(session, "demo").id, result.matches)
        shards = shards_to_erase(session, request_id, get_dataset(session, "demo").id)
    assert shards
    for shard in shards:
        assert erase_from_shard(settings, engine, request_id, "demo", shard).erased

    hits = ARTEFACTS.hits
    with unit_of_work(engine) as session:
        after = locate_dry_run(settings, session, "demo", probe, hops=0)
        indexes = current_indexes(settings, session, get_dataset(session, "demo"))[0]
    assert not {m.record_id for m in after.matches} & set(person["originals"])
    for shard, index in indexes.items():
        if shard in shards:  # the erased shards' new versions were loaded, not the cached old ones
            assert index is not cached_before[shard] and index.version == cached_before[shard].version + 1
            assert all(index.row(rid) is None for rid in person["originals"])
        else:  # the untouched shards came from the cache
            assert index is cached_before[shard]
    assert ARTEFACTS.hits > hits
    engine.dispose()


def test_cache_is_bounded_by_bytes_and_replaces_a_restamped_entry() -> None:
    cache = ArtefactCache(max_bytes=3000, sizeof=lambda value: value.nbytes)
    loads: list[str] = []

    def loader(name: str, size: int):  # noqa: ANN202
        return lambda: loads.append(name) or np.zeros(size, np.uint8)

    a = cache.get("a", 1, loader("a", 1000))
    assert cache.get("a", 1, loader("a-again", 1000)) is a  # same stamp: served from memory
    cache.get("b", 1, loader("b", 1000))
    cache.get("c", 1, loader("c", 1000))
    cache.get("a", 1, loader("a-again", 1000))  # a becomes the most recently used
    cache.get("d", 1, loader("d", 1000))  # over 3000 bytes: b, the least recently used, goes
    assert cache.bytes <= 3000 and len(cache) == 3
    cache.get("b", 1, loader("b-again", 1000))
    assert loads == ["a", "b", "c", "d", "b-again"]
    fresh = cache.get("a", 2, loader("a-v2", 1000))  # a new stamp (a new version): reloaded
    assert fresh is not a and loads[-1] == "a-v2"
    cache.get("huge", 1, loader("huge", 5000))  # larger than the bound: returned, not kept
    assert "huge" not in [k for k in cache._entries] and cache.bytes <= 3000


def test_a_cache_too_small_for_the_shards_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    # eight shards cycling through a cache that holds seven: every lookup misses (LRU thrash),
    # which a user sees only as slowness unless it is said
    cache = ArtefactCache(max_bytes=7000, sizeof=lambda value: value.nbytes)
    with caplog.at_level("WARNING", logger="pipeline.artefact_cache"):
        for _ in range(3):
            for shard in range(8):
                cache.get(shard, 1, lambda: np.zeros(1000, np.uint8))
        cache.get("huge", 1, lambda: np.zeros(9000, np.uint8))
    assert cache.hits == 0 and cache.evictions == 17
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("ERASURE_ARTEFACT_CACHE_MB" in w for w in warnings)
    assert "is full" in warnings[0] and "larger than the whole cache" in warnings[1]


def test_cache_bound_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import artefact_cache

    monkeypatch.setenv("ERASURE_ARTEFACT_CACHE_MB", "-1")
    with pytest.raises(ValueError, match="ERASURE_ARTEFACT_CACHE_MB"):
        artefact_cache._max_bytes_from_env()
    monkeypatch.setenv("ERASURE_ARTEFACT_CACHE_MB", "7")
    assert artefact_cache._max_bytes_from_env() == 7 << 20


def test_a_shard_files_footer_is_parsed_once_per_process(settings: Settings, tmp_path: Path, monkeypatch) -> None:
    import pyarrow.parquet as pq

    files = write_demo(tmp_path / "demo", 1200, seed=6)
    person = next(p for p in read_ground_truth(files.ground_truth)["persons"] if len(p["originals"]) > 1)
    ingest_source_file(files.records, IngestOptions(dataset="demo", fields=DEMO_FIELDS, n_shards=2), settings)
    parsed: list[str] = []
    read_metadata = pq.read_metadata
    monkeypatch.setattr(pq, "read_metadata", lambda path, *a, **k: parsed.append(str(path)) or read_metadata(path, *a, **k))
    engine = open_database(settings)
    ARTEFACTS.clear()
    probe = LocateRequest.parse(identifiers=[f"email={person['email']}"])
    with unit_of_work(engine) as session:
        first = locate_dry_run(settings, session, "demo", probe)
    assert parsed and len(parsed) == len(set(parsed))  # each file read from is parsed once...
    with unit_of_work(engine) as session:
        again = locate_dry_run(settings, session, "demo", probe)
    assert len(parsed) == len(set(parsed))  # ...and not again by the next request
    assert [m.record_id for m in again.matches] == [m.record_id for m in first.matches]
    assert set(person["originals"]) <= {m.record_id for m in first.matches}
