"""Ingest on both backends: validation leaves no trace, re-ingest is idempotent,
records land where the assignment says, no raw identifier reaches the database."""

from __future__ import annotations

import csv
import json
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select, text

from db.models import Dataset, Record, RecordIdentifier, ShardVersion, SourceFile
from db.session import make_engine, unit_of_work, upgrade_to_head
from db.settings import Settings
from pipeline.ingest import IngestOptions, IngestValidationError, ingest_source_file
from shards.assign import place_record
from shards.sources import FieldMap, SourceError
from shards.store import ShardStore
from tests.conftest import database_dump

FIELDS = FieldMap(identifier_fields=(("email", "email"), ("user_id", "user_id"), ("name", "name")))


def make_rows(n: int, start: int = 0) -> list[dict]:
    return [
        {
            "id": f"rec-{i:05d}",
            "text": f"Order {i} arrived late and the box was damaged, please refund item {i * 7}",
            "label": i % 3,
            "email": f"Person.{i}@Example.ORG",
            "user_id": f"uid-{i:05d}",
            "name": f"Ada Testperson{i}",
        }
        for i in range(start, start + n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def counts(settings: Settings) -> dict[str, int]:
    engine = make_engine(settings.resolved_database_url)
    try:
        with unit_of_work(engine) as session:
            return {
                model.__tablename__: session.scalar(select(func.count()).select_from(model))
                for model in (Dataset, SourceFile, Record, RecordIdentifier, ShardVersion)
            }
    finally:
        engine.dispose()


def shard_files(settings: Settings) -> list[Path]:
    return sorted(p for p in settings.shards_dir.rglob("*") if p.is_file()) if settings.shards_dir.exists() else []


def test_ingest_places_records_as_assigned(settings: Settings, tmp_path: Path) -> None:
    rows = make_rows(300)
    source = write_jsonl(tmp_path / "data.jsonl", rows)
    options = IngestOptions(dataset="shop", fields=FIELDS, n_shards=5, n_slices=3, seed=11, placement="record")
    summary = ingest_source_file(source, options, settings)

    assert summary.status == "ingested" and summary.new_records == 300 and summary.placement == "record"
    assert sum(summary.per_shard_counts.values()) == 300
    store = ShardStore(settings.shards_dir)
    seen = set()
    for shard in range(5):
        table = store.read("shop", shard)
        for rid, slc in zip(table["record_id"].to_pylist(), table["slice"].to_pylist()):
            place = place_record(rid, 11, 5, 3)
            assert (place.shard, place.slice) == (shard, slc)
            seen.add(rid)
        # training order: by slice, then order key
        keys = list(zip(table["slice"].to_pylist(), table["order_key"].to_pylist()))
        assert keys == sorted(keys)
        assert table.schema.field("features").type.list_size == 256
    assert seen == {r["id"] for r in rows}

    engine = make_engine(settings.resolved_database_url)
    with unit_of_work(engine) as session:
        for record in session.scalars(select(Record)):
            place = place_record(record.record_id, 11, 5, 3)
            assert (record.shard, record.slice, record.first_shard_version) == (place.shard, place.slice, 1)
        source_row = session.scalars(select(SourceFile)).one()
        assert source_row.row_count == 300 and len(source_row.sha256) == 64
        versions = session.scalars(select(ShardVersion)).all()
        assert {v.shard for v in versions} == set(range(5))
        assert all(v.created_by == f"ingest:source_file:{source_row.id}" for v in versions)
        # three identifiers per record, all keyed hashes, none without its record
        assert session.scalar(select(func.count()).select_from(RecordIdentifier)) == 900
        orphans = select(func.count()).select_from(RecordIdentifier).outerjoin(
            Record, (Record.dataset_id == RecordIdentifier.dataset_id) & (Record.record_id == RecordIdentifier.record_id)
        ).where(Record.record_id.is_(None))
        assert session.scalar(orphans) == 0
        assert all(len(h) == 64 for h in session.scalars(select(RecordIdentifier.keyed_hash)))
    engine.dispose()


def test_single_shard(settings: Settings, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "one.jsonl", make_rows(50))
    summary = ingest_source_file(source, IngestOptions(dataset="one", fields=FIELDS, n_shards=1, n_slices=4), settings)
    assert summary.per_shard_counts == {0: 50}
    assert ShardStore(settings.shards_dir).read("one", 0).num_rows == 50


def test_reingest_is_idempotent(settings: Settings, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "data.jsonl", make_rows(120))
    options = IngestOptions(dataset="shop", fields=FIELDS, n_shards=3, n_slices=2)
    ingest_source_file(source, options, settings)
    before_counts, before_files = counts(settings), shard_files(settings)
    before_bytes = {p: p.read_bytes() for p in before_files}

    again = ingest_source_file(source, options, settings)
    assert again.status == "already_ingested" and again.new_records == 0
    assert counts(settings) == before_counts
    assert shard_files(settings) == before_files
    assert all(p.read_bytes() == b for p, b in before_bytes.items())

    # The same records in another file (another byte layout) add nothing either.
    copy = tmp_path / "copy.jsonl"
    copy.write_text("\n".join(json.dumps(r, indent=None, separators=(",", ":")) for r in make_rows(120)) + "\n")
    third = ingest_source_file(copy, options, settings)
    assert third.new_records == 0 and third.skipped_existing == 120
    assert counts(settings)["records"] == 120


def test_appending_a_file_creates_new_versions_and_keeps_old_ones(settings: Settings, tmp_path: Path) -> None:
    options = IngestOptions(dataset="shop", fields=FIELDS, n_shards=2, n_slices=2)
    ingest_source_file(write_jsonl(tmp_path / "a.jsonl", make_rows(40)), options, settings)
    store = ShardStore(settings.shards_dir)
    v1 = {s: store.latest("shop", s) for s in range(2)}
    summary = ingest_source_file(write_jsonl(tmp_path / "b.jsonl", make_rows(40, start=30)), options, settings)
    assert summary.new_records == 30 and summary.skipped_existing == 10
    for shard in range(2):
        versions = store.versions("shop", shard)
        assert [v.version for v in versions] == [1, 2]
        assert versions[0].sha256 == v1[shard].sha256  # old version untouched
    total = sum(store.read("shop", s).num_rows for s in range(2))
    assert total == 70


def test_layout_conflict_is_refused(settings: Settings, tmp_path: Path) -> None:
    ingest_source_file(write_jsonl(tmp_path / "a.jsonl", make_rows(10)), IngestOptions(dataset="d", n_shards=2), settings)
    with pytest.raises(ValueError, match="n_shards=2, not 3"):
        ingest_source_file(write_jsonl(tmp_path / "b.jsonl", make_rows(5, 100)), IngestOptions(dataset="d", n_shards=3), settings)


def test_changed_text_for_existing_id_is_refused(settings: Settings, tmp_path: Path) -> None:
    options = IngestOptions(dataset="d", n_shards=2)
    ingest_source_file(write_jsonl(tmp_path / "a.jsonl", make_rows(10)), options, settings)
    rows = make_rows(10)
    rows[4]["text"] = "a different text under the same id"
    with pytest.raises(IngestValidationError, match="row 5: id 'rec-00004' was ingested earlier with a different text"):
        ingest_source_file(write_jsonl(tmp_path / "b.jsonl", rows), options, settings)


def test_no_raw_identifier_in_the_database(settings: Settings, tmp_path: Path) -> None:
    rows = make_rows(60)
    ingest_source_file(write_jsonl(tmp_path / "pii.jsonl", rows), IngestOptions(dataset="pii", fields=FIELDS), settings)
    dump = database_dump(settings.resolved_database_url).casefold()
    assert "rec-00059" in dump  # the dump really holds the rows
    for row in rows:
        for value in (row["email"], row["user_id"], row["name"]):
            assert value.casefold() not in dump
            assert value.split("@")[0].casefold() not in dump


# ---------------------------------------------------------------- bad input


def _bad_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = make_rows(5)
    cases: dict[str, tuple[Path, str]] = {}

    def jsonl(name: str, rows: list, expect: str) -> None:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        cases[name] = (path, expect)

    jsonl("missing_id", good[:2] + [{k: v for k, v in good[2].items() if k != "id"}], r"row 3: missing or empty id")
    jsonl("empty_text", good[:3] + [{**good[3], "text": "   "}], r"row 4: missing or empty text")
    jsonl("duplicate_id", good + [{**good[1], "text": "another"}], r"row 6: duplicate id 'rec-00001' \(first seen in row 2\)")
    # a string is a class name now (pipeline.labels); a float or an empty name is still refused
    jsonl("label_type", [{**good[0], "label": 1.5}] + good[1:], r"row 1: label 'label' must be an integer or a class")
    jsonl("label_empty", [{**good[0], "label": "  "}] + good[1:], r"row 1: label 'label' must be an integer or a class")
    jsonl("id_type", good[:1] + [{**good[1], "id": [1, 2]}], r"row 2: id 'id' must be a string or integer")
    jsonl("text_type", good[:1] + [{**good[1], "text": 42}], r"row 2: text 'text' must be a string")
    jsonl("bad_json", good[:2] + ['{"id": "x", "text": '], r"row 3: invalid JSON")
    jsonl("not_object", good[:1] + ["[1, 2, 3]"], r"row 2: expected an object")
    jsonl("bad_email", good[:1] + [{**good[1], "email": "no-at-sign"}], r"row 2: bad identifier: not an email")
    jsonl("empty_file", [], r"the file holds no records")
    non_utf8 = tmp_path / "latin1.jsonl"
    non_utf8.write_bytes(json.dumps(good[0]).encode() + b"\n" + '{"id": "x", "text": "caf\xe9"}\n'.encode("latin-1"))
    cases["non_utf8"] = (non_utf8, r"row 2: not valid UTF-8")
    csv_path = tmp_path / "ragged.csv"
    with open(csv_path, "w", newline="") as fh:
        fh.write("id,text,label\n1,hello there,0\n2,too,many,values,1\n3,,1\n")
    cases["csv_ragged_and_empty"] = (csv_path, r"row 2: has 5 values.*\n.*row 3: missing or empty text")
    cases["missing_file"] = (tmp_path / "nope.jsonl", r"no such file")
    cases["directory"] = (tmp_path, r"cannot tell the format|is a directory")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet at all")
    cases["not_parquet"] = (garbage, r"not a readable Parquet file")
    return cases


BAD_CASES = [
    "missing_id", "empty_text", "duplicate_id", "label_type", "id_type", "text_type", "bad_json", "not_object",
    "bad_email", "empty_file", "non_utf8", "csv_ragged_and_empty", "missing_file", "directory", "not_parquet",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_refused_and_leaves_no_trace(case: str, sqlite_settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    path, expected = _bad_cases(tmp_path / "in")[case]
    upgrade_to_head(sqlite_settings.resolved_database_url)  # an existing install: tables there, empty
    options = IngestOptions(dataset="bad", fields=FIELDS, n_shards=2)
    with pytest.raises((IngestValidationError, SourceError)) as info:
        ingest_source_file(path, options, sqlite_settings)
    assert __import__("re").search(expected, str(info.value)), str(info.value)
    assert shard_files(sqlite_settings) == []
    engine = make_engine(sqlite_settings.resolved_database_url)
    with unit_of_work(engine) as session:
        for model in (Dataset, SourceFile, Record, RecordIdentifier, ShardVersion):
            assert session.scalar(select(func.count()).select_from(model)) == 0
    engine.dispose()


def test_error_report_names_first_twenty_rows_and_the_count(sqlite_settings: Settings, tmp_path: Path) -> None:
    rows = make_rows(60)
    for row in rows[10:45]:
        row["text"] = ""
    path = write_jsonl(tmp_path / "many.jsonl", rows)
    with pytest.raises(IngestValidationError) as info:
        ingest_source_file(path, IngestOptions(dataset="bad"), sqlite_settings)
    message = str(info.value)
    assert message.startswith("35 invalid row(s); nothing was ingested. First 20:")
    assert "row 11:" in message and "row 30:" in message and "row 31:" not in message


def test_bad_input_on_postgres_leaves_no_trace(tmp_path: Path, postgres_url: str) -> None:
    settings = Settings(home=tmp_path / "home", database_url=postgres_url, secret_key="x" * 32)
    rows = make_rows(10)
    rows[7]["label"] = 1.5
    upgrade_to_head(postgres_url)
    with pytest.raises(IngestValidationError, match="row 8: label"):
        ingest_source_file(write_jsonl(tmp_path / "bad.jsonl", rows), IngestOptions(dataset="bad"), settings)
    assert counts(settings) == {t: 0 for t in counts(settings)}
    assert shard_files(settings) == []


def test_database_failure_after_shard_write_removes_new_versions(sqlite_settings: Settings, tmp_path: Path) -> None:
    """A real fault in the lineage transaction (a trigger aborting the insert)
    rolls back the database and deletes the shard versions written for it."""
    options = IngestOptions(dataset="shop", fields=FIELDS, n_shards=2)
    ingest_source_file(write_jsonl(tmp_path / "a.jsonl", make_rows(20)), options, sqlite_settings)
    before_counts, before_files = counts(sqlite_settings), shard_files(sqlite_settings)
    engine = make_engine(sqlite_settings.resolved_database_url)
    with engine.begin() as conn:
        conn.execute(text(
            "CREATE TRIGGER fail_identifiers BEFORE INSERT ON record_identifiers "
            "BEGIN SELECT RAISE(ABORT, 'simulated disk full'); END"
        ))
    engine.dispose()
    with pytest.raises(Exception, match="simulated disk full"):
        ingest_source_file(write_jsonl(tmp_path / "b.jsonl", make_rows(20, start=100)), options, sqlite_settings)
    assert counts(sqlite_settings) == before_counts
    assert shard_files(sqlite_settings) == before_files


def test_csv_and_parquet_sources(settings: Settings, tmp_path: Path) -> None:
    rows = make_rows(30)
    csv_path = tmp_path / "data.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:15])
    pq.write_table(pa.Table.from_pylist(rows[15:]), tmp_path / "data.parquet")
    options = IngestOptions(dataset="mixed", fields=FIELDS, n_shards=2)
    first = ingest_source_file(csv_path, options, settings)
    second = ingest_source_file(tmp_path / "data.parquet", options, settings)
    assert (first.new_records, second.new_records) == (15, 15)
    store = ShardStore(settings.shards_dir)
    labels = {}
    for shard in range(2):
        table = store.read("mixed", shard)
        labels.update(zip(table["record_id"].to_pylist(), table["label"].to_pylist()))
    assert labels == {r["id"]: r["label"] for r in rows}


class _EraseWhileWriting:
    """A reporter that, when ingest has written its new shard files but not yet
    recorded them, lets an erasure of ``record_id`` commit first: the race the
    shard lock and re-check in ingest exist for."""

    def __init__(self, settings: Settings, dataset: str, record_id: str) -> None:
        self.settings, self.dataset, self.record_id = settings, dataset, record_id

    @contextmanager
    def step(self, description: str, total: int | None):  # noqa: ANN201
        from pipeline.progress import _SilentStep

        yield _SilentStep()
        if description == "writing shard versions":
            self._erase()

    def _erase(self) -> None:
        from db.lineage import add_shard_version, get_dataset, latest_shard_versions
        from db.locks import lock_shard

        engine = make_engine(self.settings.resolved_database_url)
        try:
            with unit_of_work(engine) as session:
                dataset = get_dataset(session, self.dataset)
                record = session.get(Record, (dataset.id, self.record_id))
                lock_shard(session, dataset.id, record.shard)
                base = latest_shard_versions(session, dataset.id)[record.shard]
                ref = ShardStore(self.settings.shards_dir).write_without(
                    self.dataset, record.shard, [self.record_id], base_version=base.version)
                add_shard_version(session, dataset_id=dataset.id, shard=record.shard, version=ref.version,
                                  path=str(ref.path), sha256=ref.sha256, row_count=ref.row_count,
                                  created_by="erasure:test")
                record.erased_in_shard_version = ref.version
        finally:
            engine.dispose()


def test_an_erasure_during_an_append_is_not_undone(settings: Settings, tmp_path: Path) -> None:
    from pipeline.ingest import ShardChangedDuringIngest

    options = IngestOptions(dataset="shop", fields=FIELDS, n_shards=1, n_slices=2)
    ingest_source_file(write_jsonl(tmp_path / "a.jsonl", make_rows(20)), options, settings)
    before = counts(settings)
    append = write_jsonl(tmp_path / "b.jsonl", make_rows(10, start=100))
    with pytest.raises(ShardChangedDuringIngest, match="run the same ingest again"):
        ingest_source_file(append, options, settings, _EraseWhileWriting(settings, "shop", "rec-00003"))
    store = ShardStore(settings.shards_dir)
    # the append left nothing: only the erasure's version is new, and it lacks the record
    assert counts(settings) == {**before, "shard_versions": before["shard_versions"] + 1}
    assert len(store.versions("shop", 0)) == 2  # v1 and the erasure's (the append's file was removed)
    assert "rec-00003" not in store.read("shop", 0)["record_id"].to_pylist()
    # run again: the append builds on the erased version, so the record stays gone
    summary = ingest_source_file(append, options, settings)
    assert summary.new_records == 10
    latest = store.read("shop", 0)["record_id"].to_pylist()
    assert "rec-00003" not in latest and len(latest) == 29
