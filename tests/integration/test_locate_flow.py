"""Locate through the database and the saved shard indexes, on both backends;
tombstone screening at ingest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db.models import Record
from db.session import unit_of_work
from db.settings import Settings
from dedup.locate import LocateRequest
from dedup.minhash import minhash_signatures
from dedup.tombstones import TombstoneSet
from pipeline.database import open_database
from api.demo import DEMO_FIELDS
from pipeline.ingest import IngestOptions, ingest_source_file
from pipeline.locate import dataset_minhash, locate_dry_run, tombstone_path
from shards.demo_data import read_ground_truth, write_demo
from shards.files import write_atomically
from shards.store import ShardStore


REQUEST = "6a0d3c1e-7f51-4a8e-9b9e-1f2d3c4b5a69"


@pytest.fixture
def demo(tmp_path: Path) -> dict:
    files = write_demo(tmp_path / "demo", 2500, seed=3)
    truth = read_ground_truth(files.ground_truth)
    return {"files": files, "truth": truth}


def test_locate_finds_the_persons_records_and_planted_copies(settings: Settings, demo: dict) -> None:
    ingest_source_file(demo["files"].records, IngestOptions(dataset="demo", fields=DEMO_FIELDS, n_shards=4), settings)
    copies = {c["id"]: c for c in demo["truth"]["copies"]}
    persons = [p for p in demo["truth"]["persons"] if p["copies"]][:4]
    assert persons
    engine = open_database(settings)
    store = ShardStore(settings.shards_dir)
    before = [v.sha256 for s in range(4) for v in store.versions("demo", s)]
    for person in persons:
        request = LocateRequest.parse([f"email={person['email'].upper()}"])
        with unit_of_work(engine) as session:
            result = locate_dry_run(settings, session, "demo", request)
        erase = {m.record_id: m for m in result.by_decision("erase")}
        for original in person["originals"]:
            assert erase[original].method.value == "identifier"
        for copy_id in person["copies"]:
            copy = copies[copy_id]
            if copy["kind"] == "exact" or copy["jaccard"] >= 0.8:
                assert copy_id in erase, (copy, person["originals"])
        for rid, match in erase.items():
            if rid in copies:
                assert copies[rid]["person"] == person["person"]
            elif rid not in person["originals"]:
                pytest.fail(f"{rid} marked erase but belongs to nobody in the request: {match}")
    # a dry run: nothing changed
    assert [v.sha256 for s in range(4) for v in store.versions("demo", s)] == before


def test_locate_by_sample_text_without_identifiers(sqlite_settings: Settings, demo: dict) -> None:
    ingest_source_file(demo["files"].records, IngestOptions(dataset="demo", fields=DEMO_FIELDS, n_shards=4), sqlite_settings)
    rows = [json.loads(line) for line in demo["files"].records.read_text().splitlines()]
    target = rows[100]
    request = LocateRequest.parse(samples=[target["text"]])
    with unit_of_work(open_database(sqlite_settings)) as session:
        result = locate_dry_run(sqlite_settings, session, "demo", request, hops=0)
        trusting = sqlite_settings.model_copy(update={"sample_only_matches": "score"})
        scored = locate_dry_run(trusting, session, "demo", request, hops=0)
    # reached only from the requester's sample: review by default, whatever its score
    found = {m.record_id: m for m in result.by_decision("review")}
    assert found[target["id"]].score == pytest.approx(1.0) and found[target["id"]].provenance.value == "sample"
    assert {m.record_id for m in scored.by_decision("erase")} >= {target["id"]}  # ERASURE_SAMPLE_ONLY_MATCHES=score


def test_unknown_dataset_is_a_clear_error(sqlite_settings: Settings) -> None:
    with unit_of_work(open_database(sqlite_settings)) as session, pytest.raises(LookupError, match="no dataset named"):
        locate_dry_run(sqlite_settings, session, "nope", LocateRequest.parse(samples=["some text here"]))


def test_ingest_screens_out_erased_content(settings: Settings, tmp_path: Path, demo: dict) -> None:
    rows = [json.loads(line) for line in demo["files"].records.read_text().splitlines()]
    erased = rows[:3]
    params = dataset_minhash(settings, "demo")  # keyed: the dataset's MinHash key
    tombstones = TombstoneSet.empty(params).added(
        minhash_signatures([r["text"] for r in erased], params), [f"{REQUEST}/0/{r['id']}" for r in erased], params
    )
    write_atomically(tombstone_path(settings, "demo"), tombstones.to_bytes())
    # the refresh brings the erased texts back under new ids, lightly edited
    refresh = tmp_path / "refresh.jsonl"
    back = [{**r, "id": f"again-{i}", "text": r["text"].upper() + " !!"} for i, r in enumerate(erased)]
    fresh = [{**r, "id": f"fresh-{i}"} for i, r in enumerate(rows[3:10])]
    refresh.write_text("".join(json.dumps(r) + "\n" for r in back + fresh))
    summary = ingest_source_file(refresh, IngestOptions(dataset="demo", fields=DEMO_FIELDS, n_shards=2), settings)
    assert summary.screened_out == 3 and summary.new_records == 7
    assert sorted(s["record_id"] for s in summary.screened) == ["again-0", "again-1", "again-2"]
    assert {s["tombstone"] for s in summary.screened} == {f"{REQUEST}/0/{r['id']}" for r in erased}
    with unit_of_work(open_database(settings)) as session:
        assert session.scalar(select(func.count()).select_from(Record)) == 7
    stored = set()
    for shard in range(2):
        if ShardStore(settings.shards_dir).latest("demo", shard):
            stored |= set(ShardStore(settings.shards_dir).read("demo", shard)["record_id"].to_pylist())
    assert stored == {f"fresh-{i}" for i in range(7)}
