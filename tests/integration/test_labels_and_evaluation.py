"""Labels as people have them and using the model (issue 11, points 4 and 5), on both backends:
class names through a label vocabulary in the database, new classes refused unless allowed,
``evaluate`` / ``predict`` on files read like ingest reads them, and the monolithic baseline
(recorded, never an ensemble member, deleted by the purge after an erasure from a shard it saw)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db.audit import AuditEvent
from db.lineage import latest_shard_versions
from db.models import Dataset, SourceFile
from db.session import unit_of_work
from db.settings import Settings
from db.training import BaselineModel, LabelName
from pipeline.database import open_database
from pipeline.erasure import _purge_baselines
from pipeline.evaluation import EvaluationInputError, evaluate_file, predict_file
from pipeline.gc import _live
from pipeline.ingest import IngestOptions, ingest_source_file
from pipeline.labels import LabelVocabularyError
from pipeline.training import (
    checkpoint_store,
    list_shards,
    publish_trained_members,
    train_baseline,
    train_one_shard,
)
from shards.sources import FieldMap

OPTIONS = {"epochs": 6.0, "hidden": [16], "batch_size": 32}
WORDS = {"sport": "football match goal team score", "food": "pasta recipe cook dinner taste",
         "tech": "laptop software code computer chip"}


def _write(path: Path, start: int, n: int, classes: tuple[str, ...]) -> Path:
    rows = []
    for i in range(start, start + n):
        label = classes[i % len(classes)]
        rows.append({"id": f"r{i}", "text": f"{WORDS.get(label, label + ' thing')} number {i}", "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _ingest(settings: Settings, path: Path, **kw) -> object:  # noqa: ANN003
    return ingest_source_file(path, IngestOptions(dataset="named", n_shards=2, n_slices=2, **kw), settings)


def _count(settings: Settings, model) -> int:  # noqa: ANN001
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            return session.scalar(select(func.count()).select_from(model))
    finally:
        engine.dispose()


def test_class_names_get_a_vocabulary_and_new_ones_need_consent(settings: Settings, tmp_path: Path) -> None:
    first = _ingest(settings, _write(tmp_path / "a.jsonl", 0, 60, ("sport", "food", "tech")))
    assert first.labels == {"kind": "names", "classes": 3, "added": ["food", "sport", "tech"]}
    later = _write(tmp_path / "b.jsonl", 60, 30, ("sport", "music"))
    with pytest.raises(LabelVocabularyError, match=r"1 new one\(s\): 'music'.*--allow-new-labels"):
        _ingest(settings, later)
    assert _count(settings, SourceFile) == 1 and _count(settings, LabelName) == 3  # nothing half-written
    second = _ingest(settings, later, allow_new_labels=True)
    assert second.labels == {"kind": "names", "classes": 4, "added": ["music"]}
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            names = session.execute(select(LabelName.label_index, LabelName.name).order_by(LabelName.label_index))
            assert [tuple(r) for r in names] == [(0, "food"), (1, "sport"), (2, "tech"), (3, "music")]
            assert session.scalars(select(Dataset.label_kind)).one() == "names"
            events = [json.loads(e.details) for e in session.scalars(
                select(AuditEvent).where(AuditEvent.kind == "dataset.ingested").order_by(AuditEvent.id))]
            assert [e["labels_added"] for e in events] == [3, 1]
    finally:
        engine.dispose()
    # the number of classes is the vocabulary's size, not the highest index + 1 of the data
    member = train_one_shard(settings, "named", 0, {**OPTIONS, "epochs": 1.0})
    payload = checkpoint_store(settings, "named").load(member["checkpoint"])
    assert payload["config"]["model"]["num_classes"] == 4


def test_integer_datasets_keep_integers_and_refuse_names(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "ints.csv"
    path.write_text("id,text,label\n" + "".join(f"i{i},text {i},{i % 2}\n" for i in range(20)), encoding="utf-8")
    summary = ingest_source_file(path, IngestOptions(dataset="ints", n_shards=1, n_slices=1), settings)
    assert summary.labels["kind"] == "integer" and _count(settings, LabelName) == 0
    named = tmp_path / "names.jsonl"
    named.write_text(json.dumps({"id": "n1", "text": "x", "label": "cat"}) + "\n", encoding="utf-8")
    with pytest.raises(LabelVocabularyError, match="has integer labels, but this file has class names"):
        ingest_source_file(named, IngestOptions(dataset="ints", n_shards=1, n_slices=1, allow_new_labels=True),
                           settings)


def test_evaluate_predict_and_a_baseline_that_an_erasure_purges(settings: Settings, tmp_path: Path) -> None:
    _ingest(settings, _write(tmp_path / "train.jsonl", 0, 240, ("sport", "food", "tech")))
    members = [train_one_shard(settings, "named", s, OPTIONS) for s in list_shards(settings, "named")]
    published = publish_trained_members(settings, "named", members)
    test_file = _write(tmp_path / "test.jsonl", 1000, 60, ("sport", "food", "tech"))
    without = evaluate_file(settings, "named", test_file)
    assert without["baseline"] is None and without["records"] == 60
    assert without["ensemble_version"] == published["ensemble_version"]
    assert without["accuracy"] > 0.9  # the words give the class away
    assert {row["label"] for row in without["per_class"]} == {"food", "sport", "tech"}
    assert sum(row["support"] for row in without["per_class"]) == 60

    baseline = train_baseline(settings, "named", OPTIONS)
    assert baseline["records_seen"] == 240
    scored = evaluate_file(settings, "named", test_file)
    assert scored["baseline"]["id"] == baseline["baseline_id"] and scored["baseline"]["accuracy"] > 0.9
    assert scored["ensemble_version"] == published["ensemble_version"]  # not mixed into the ensemble

    out = tmp_path / "out" / "predictions.jsonl"
    predicted = predict_file(settings, "named", test_file, out)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert predicted["records"] == len(rows) == 60
    assert {r["label"] for r in rows} <= {"food", "sport", "tech"} and all(0 < r["confidence"] <= 1 for r in rows)

    unknown = _write(tmp_path / "unknown.jsonl", 2000, 4, ("sport", "opera"))
    with pytest.raises(EvaluationInputError, match="not in the vocabulary of 'named': 'opera'"):
        evaluate_file(settings, "named", unknown)

    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            row = session.scalars(select(BaselineModel)).one()
            path = Path(row.path)
            assert path.is_file() and _live(session).checkpoints[path] is False  # a live file, accounted for
            dataset_id = row.dataset_id
            trained_on = json.loads(row.shard_versions)
            assert trained_on == {str(s): v.version for s, v in latest_shard_versions(session, dataset_id).items()}
            # an erasure from shard 0's version it saw: the purge deletes the baseline with the old files
            purged = _purge_baselines(session, dataset_id, 0, lambda version, *a: version == trained_on["0"],
                                      row.created_at)
            assert purged == [row.checkpoint_key] and not path.exists()
    finally:
        engine.dispose()
    assert evaluate_file(settings, "named", test_file)["baseline"] is None
