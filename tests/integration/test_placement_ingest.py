"""Subject placement through ingest, on both backends: a person's records share one shard and one
slice, a later file's records of the same person join that shard, and the estimate of their
erasure equals what the retrain planner then does."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from sqlalchemy import select

from api.demo import DEMO_FIELDS
from db.lineage import DatasetConflict, get_dataset
from db.models import Dataset, Record
from db.session import make_engine, unit_of_work
from db.settings import Settings
from pipeline.ingest import IngestOptions, ingest_source_file
from pipeline.placement import live_slice_counts, retrain_estimate_for, subject_placement_view
from shards.checkpoints import CheckpointStore
from shards.demo_data import write_demo
from shards.model import ModelSpec
from shards.retrain import plan_retrain, retrain_estimate
from shards.store import ShardStore
from shards.training import DEFAULT_SCHEDULE, SliceSchedule, TrainConfig, shard_from_table, train_shard

S, R = 4, 4


def _places(settings: Settings, dataset: str) -> dict[str, tuple[int, int]]:
    engine = make_engine(settings.resolved_database_url)
    try:
        with unit_of_work(engine) as session:
            ds = get_dataset(session, dataset)
            return {r.record_id: (r.shard, r.slice) for r in session.scalars(
                select(Record).where(Record.dataset_id == ds.id))}
    finally:
        engine.dispose()


def test_subject_placement_keeps_a_person_together_and_prices_their_erasure(settings: Settings,
                                                                             tmp_path: Path) -> None:
    files = write_demo(tmp_path / "demo", 1500, seed=3, workers=1)
    truth = [json.loads(line) for line in files.ground_truth.read_text().splitlines()]
    persons = [t for t in truth if t["type"] == "person" and len(t["originals"]) >= 3]
    copies = {t["id"]: t for t in truth if t["type"] == "copy"}
    options = IngestOptions(dataset="demo", fields=DEMO_FIELDS, n_shards=S, n_slices=R)
    summary = ingest_source_file(files.records, options, settings)
    assert summary.placement == "subject" and summary.new_records == 1500
    assert summary.placement_report["copies_joined"] > 0
    places = _places(settings, "demo")

    # every person's originals (and their exact copies) in one shard and one slice
    for person in persons:
        together = set(person["originals"]) | {c for c in person["copies"] if copies[c]["kind"] == "exact"}
        assert len({places[r] for r in together}) == 1, person["person"]
    sizes = Counter(shard for shard, _ in places.values())
    assert max(sizes.values()) / (1500 / S) <= 1.1

    # a second file: new records of known persons join their shard; nothing placed before moves
    chosen = persons[:10]
    rows = [{"id": f"new-{p['person']}-{j}", "text": f"Follow-up number {j} about order {p['person']} for support",
             "label": 0, "email": p["email"], "user_id": None, "name": None}
            for p in chosen for j in range(2)]
    second = tmp_path / "second.jsonl"
    second.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    ingest_source_file(second, IngestOptions(dataset="demo", fields=DEMO_FIELDS, n_shards=S, n_slices=R), settings)
    after = _places(settings, "demo")
    assert all(after[rid] == place for rid, place in places.items())
    for p in chosen:
        assert {after[f"new-{p['person']}-{j}"][0] for j in range(2)} == {places[p["originals"][0]][0]}

    # the placement is fixed per dataset
    with pytest.raises(DatasetConflict, match="placement"):
        ingest_source_file(second, IngestOptions(dataset="demo", fields=DEMO_FIELDS, n_shards=S, n_slices=R,
                                                 placement="record"), settings)

    # one person's erasure: one shard from a late slice; the estimate is the planner's cost
    person = max(persons[10:], key=lambda p: places[p["originals"][0]][1])
    ids = person["originals"]
    shard, slc = places[ids[0]]
    assert slc >= R - 2
    store = ShardStore(settings.shards_dir)
    table = store.read("demo", shard)
    data = shard_from_table(table, str(shard))
    config = TrainConfig(model=ModelSpec(data.features.shape[1], 6, hidden=(8,)),
                         schedule=SliceSchedule.named(DEFAULT_SCHEDULE, R, 2), batch_size=64, seed=0)
    checkpoints = CheckpointStore(tmp_path / "ckpt")
    train_shard(data, config, checkpoints, threads=1)
    plan = plan_retrain(data, ids, config, checkpoints)
    engine = make_engine(settings.resolved_database_url)
    try:
        with unit_of_work(engine) as session:
            dataset = get_dataset(session, "demo")
            # nothing trained through the pipeline here: the default schedule's shape, the same fraction as config's
            untrained = retrain_estimate_for(settings, session, dataset, [places[r] for r in ids])
            counts = {s: [0] * R for s in range(S)}
            for place, n in live_slice_counts(session, dataset.id).items():
                counts[place.shard][place.slice] = n
            estimate = retrain_estimate(counts, [places[r] for r in ids], config.schedule)
            view = subject_placement_view(settings, session, [("demo", *places[r]) for r in ids])
            assert session.scalars(select(Dataset.placement)).one() == "subject"
    finally:
        engine.dispose()
    assert [s.shard for s in estimate.shards] == [shard]
    assert estimate.shards[0].earliest_slice == plan.earliest_affected_slice == slc
    assert estimate.shards[0].samples == plan.samples_to_process
    assert estimate.shards[0].shard_training_samples == plan.full_training_samples
    assert estimate.fraction <= 2 * (R - slc) * (R + slc + 1) / (R * (R + 1) * S)
    assert untrained.fraction == pytest.approx(estimate.fraction, rel=0.02)
    assert view[0]["placement"] == "subject" and view[0]["shards"] == [{"shard": shard, "slices": [slc],
                                                                        "records": len(ids)}]
    assert view[0]["retrain_estimate"]["fraction"] == round(untrained.fraction, 6)


def test_record_placement_is_kept_for_data_without_identifiers(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "text": f"text number {i}", "label": i % 2}) + "\n"
                            for i in range(40)), encoding="utf-8")
    summary = ingest_source_file(path, IngestOptions(dataset="plain", n_shards=2, n_slices=2), settings)
    assert summary.placement == "record" and summary.placement_report == {}
    with pytest.raises(ValueError, match="--placement must be one of"):
        ingest_source_file(path, IngestOptions(dataset="other", placement="person"), settings)
    by_shard = defaultdict(int)
    for shard, _ in _places(settings, "plain").values():
        by_shard[shard] += 1
    assert sum(by_shard.values()) == 40
