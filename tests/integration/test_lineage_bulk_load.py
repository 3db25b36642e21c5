"""Bulk lineage loads keep their integrity when PostgreSQL rebuilds the keys set-wise
(``db.lineage.lineage_bulk_load``): a bad source file id or a duplicate record is refused
with nothing written and the schema as migrated; a reader already on the tables is not
blocked; locate's identifier lookup stays an index lookup."""

from __future__ import annotations

import psycopg
import pyarrow as pa
import pytest
from alembic import command
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

# SQLAlchemy's wrapper, or psycopg's own error from a COPY (bulk_insert drives the COPY on the driver's connection)
REFUSED = (IntegrityError, psycopg.IntegrityError)

from db.lineage import (
    add_source_file,
    bulk_insert,
    digests_from_hex,
    ensure_dataset,
    lineage_bulk_load,
)
from db.models import Record, RecordIdentifier
from db.session import alembic_config, make_engine, unit_of_work, upgrade_to_head
from db.settings import Settings
from pipeline.ingest import IngestOptions, ingest_source_file
from tests.integration.test_ingest import FIELDS, make_rows, write_jsonl

KEYS_SQL = text(
    "SELECT conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint "
    "WHERE conrelid IN ('records'::regclass, 'record_identifiers'::regclass) "
    "UNION ALL SELECT pg_get_indexdef(indexrelid) FROM pg_index "
    "WHERE indrelid IN ('records'::regclass, 'record_identifiers'::regclass) ORDER BY 1"
)


def _keys(engine) -> list[str]:  # noqa: ANN001
    with engine.connect() as conn:
        return list(conn.scalars(KEYS_SQL))


def _dataset_and_source(engine) -> tuple[int, int]:  # noqa: ANN001
    with unit_of_work(engine) as session:
        dataset = ensure_dataset(session, name="shop", seed=0, n_shards=1, n_slices=1, feature_dim=8,
                                 embedder="hashing", key_id="k")
        source = add_source_file(session, dataset_id=dataset.id, path="/a.jsonl", sha256="a" * 64, fmt="jsonl",
                                 row_count=3, new_record_count=3)
        return dataset.id, source.id


def _load(engine, dataset_id: int, source_id: int, ids: list[str], announced: int) -> str:  # noqa: ANN001
    n = len(ids)
    records = pa.table({"dataset_id": [dataset_id] * n, "record_id": ids, "shard": [0] * n, "slice": [0] * n,
                        "content_hmac": ["c" * 64] * n, "source_file_id": [source_id] * n,
                        "row_number": list(range(n)), "first_shard_version": [1] * n})
    identifiers = pa.table({"dataset_id": [dataset_id] * n, "record_id": ids, "kind": ["email"] * n,
                            "keyed_hash": digests_from_hex(pa.array([f"{i:064x}" for i in range(n)]))})
    with unit_of_work(engine) as session, lineage_bulk_load(session, announced) as keys:
        bulk_insert(session, "records", records)
        bulk_insert(session, "record_identifiers", identifiers)
    return keys


def _counts(engine) -> tuple[int, int]:  # noqa: ANN001
    with unit_of_work(engine) as session:
        return (session.scalar(select(func.count()).select_from(Record)),
                session.scalar(select(func.count()).select_from(RecordIdentifier)))


@pytest.mark.parametrize("held", [0, 5], ids=["rebuild-into-empty", "incremental-into-bigger"])
def test_a_record_naming_a_missing_source_file_is_refused_and_nothing_is_written(database_url: str, held: int) -> None:
    upgrade_to_head(database_url)
    engine = make_engine(database_url)
    try:
        dataset_id, source_id = _dataset_and_source(engine)
        if held:
            _load(engine, dataset_id, source_id, [f"old-{n}" for n in range(held)], held)
        postgres = engine.dialect.name == "postgresql"
        keys_before = _keys(engine) if postgres else []
        with pytest.raises(REFUSED, match="fk_records_source_file|FOREIGN KEY constraint failed"):
            _load(engine, dataset_id, source_id + 1, ["new-1", "new-2"], 2)
        assert _counts(engine) == (held, held)
        if postgres:
            assert _keys(engine) == keys_before  # the dropped keys came back with the rollback
    finally:
        engine.dispose()


def test_a_duplicate_record_in_a_rebuilt_load_is_refused_and_nothing_is_written(postgres_url: str) -> None:
    upgrade_to_head(postgres_url)
    engine = make_engine(postgres_url)
    try:
        dataset_id, source_id = _dataset_and_source(engine)
        keys_before = _keys(engine)
        with pytest.raises(REFUSED, match="pk_records"):
            _load(engine, dataset_id, source_id, ["r1", "r2", "r1"], 3)
        assert _counts(engine) == (0, 0)
        assert _keys(engine) == keys_before
        assert _load(engine, dataset_id, source_id, ["r1", "r2"], 2) == "rebuild"
        assert _counts(engine) == (2, 2)
    finally:
        engine.dispose()


def test_a_first_ingest_rebuilds_the_keys_and_leaves_the_schema_as_migrated(tmp_path, postgres_url: str) -> None:  # noqa: ANN001
    settings = Settings(home=tmp_path / "home", database_url=postgres_url, secret_key="x" * 32)
    upgrade_to_head(postgres_url)
    engine = make_engine(postgres_url)
    try:
        keys_before = _keys(engine)
        options = IngestOptions(dataset="shop", fields=FIELDS, n_shards=2)
        first = ingest_source_file(write_jsonl(tmp_path / "a.jsonl", make_rows(60)), options, settings)
        assert first.lineage_keys == "rebuild"
        assert _keys(engine) == keys_before
        command.check(alembic_config(postgres_url))  # no drift from the models either
        # fewer rows than the tables hold: keys maintained row by row
        second = ingest_source_file(write_jsonl(tmp_path / "b.jsonl", make_rows(10, start=500)), options, settings)
        assert second.lineage_keys == "incremental"
        assert _counts(engine) == (70, 210)
        with engine.connect() as conn:  # locate's lookup (pipeline.locate.seeds_for_hashes) uses the key
            conn.execute(text("SET enable_seqscan = off"))  # tiny tables: ask whether the index serves it
            plan = "\n".join(conn.scalars(text(
                "EXPLAIN SELECT record_id FROM record_identifiers WHERE kind = 'email' AND keyed_hash = :h "
                "AND dataset_id = 1"), {"h": "f" * 64}))
        assert "pk_record_identifiers" in plan and "Index Cond: ((keyed_hash = " in plan, plan
    finally:
        engine.dispose()


def test_a_reader_on_the_tables_is_not_blocked_the_ingest_keeps_keys_incremental(tmp_path, postgres_url: str) -> None:  # noqa: ANN001
    settings = Settings(home=tmp_path / "home", database_url=postgres_url, secret_key="x" * 32)
    upgrade_to_head(postgres_url)
    with psycopg.connect(postgres_url.replace("postgresql+psycopg://", "postgresql://")) as reader:
        reader.execute("SELECT count(*) FROM records")  # its transaction stays open: ACCESS SHARE held
        summary = ingest_source_file(write_jsonl(tmp_path / "a.jsonl", make_rows(30)),
                                     IngestOptions(dataset="shop", fields=FIELDS, n_shards=2), settings)
        assert summary.lineage_keys == "incremental"
    engine = make_engine(postgres_url)
    try:
        assert _counts(engine) == (30, 90)
    finally:
        engine.dispose()


def test_any_record_id_text_arrives_unchanged(database_url: str) -> None:
    """Any text arrives unchanged: commas, quotes, newlines, backslashes, non-ASCII, empty, "\\N"."""
    upgrade_to_head(database_url)
    engine = make_engine(database_url)
    ids = ['a,b', 'say "hi"', "two\nlines", "back\\slash", "tab\there", "é ü 中", "", "N", "\\N"]
    try:
        dataset_id, source_id = _dataset_and_source(engine)
        _load(engine, dataset_id, source_id, ids, len(ids))
        with unit_of_work(engine) as session:
            assert sorted(session.scalars(select(Record.record_id))) == sorted(ids)
            assert sorted(session.scalars(select(RecordIdentifier.record_id))) == sorted(ids)
            assert session.scalar(select(func.count()).where(Record.content_hmac.is_(None))) == 0
    finally:
        engine.dispose()


def test_keyed_hashes_are_stored_as_their_bytes_and_read_back_as_hex(postgres_url: str) -> None:
    upgrade_to_head(postgres_url)
    engine = make_engine(postgres_url)
    try:
        dataset_id, source_id = _dataset_and_source(engine)
        _load(engine, dataset_id, source_id, ["r0", "r1", "r2"], 3)
        with engine.connect() as conn:
            assert set(conn.scalars(text("SELECT octet_length(keyed_hash) FROM record_identifiers"))) == {32}
        with unit_of_work(engine) as session:
            assert sorted(session.scalars(select(RecordIdentifier.keyed_hash))) == [f"{i:064x}" for i in range(3)]
            assert session.scalar(select(RecordIdentifier.record_id).where(
                RecordIdentifier.keyed_hash == f"{1:064x}")) == "r1"
            with pytest.raises(Exception, match="lower-case hex"):
                session.scalar(select(RecordIdentifier.record_id).where(RecordIdentifier.keyed_hash == "F" * 64))
    finally:
        engine.dispose()


@pytest.mark.parametrize("digest", ["z" * 64, "F" * 64, "0" * 63, "0" * 65, None])
def test_only_lower_case_hex_digests_are_decoded(digest: str | None) -> None:
    column = pa.array(["0" * 64, "ab" * 32, digest, "f" * 64])
    with pytest.raises(ValueError, match="row 2"):
        digests_from_hex(column)
    assert digests_from_hex(column.slice(3)).to_pylist() == [b"\xff" * 32]


def test_a_bulk_insert_takes_digests_as_bytes_and_nothing_is_written_otherwise(database_url: str) -> None:
    upgrade_to_head(database_url)
    engine = make_engine(database_url)
    try:
        dataset_id, source_id = _dataset_and_source(engine)
        identifiers = pa.table({"dataset_id": [dataset_id], "record_id": ["r1"], "kind": ["email"],
                                "keyed_hash": ["0" * 64]})
        records = pa.table({"dataset_id": [dataset_id], "record_id": ["r1"], "shard": [0], "slice": [0],
                            "content_hmac": ["c" * 64], "source_file_id": [source_id], "row_number": [1],
                            "first_shard_version": [1]})
        with pytest.raises(ValueError, match="keyed_hash takes 32-byte digests"):
            with unit_of_work(engine) as session, lineage_bulk_load(session, 1):
                bulk_insert(session, "records", records)
                bulk_insert(session, "record_identifiers", identifiers)
        assert _counts(engine) == (0, 0)
        _load(engine, dataset_id, source_id, ["r1"], 1)  # SQLite keeps the hex text, PostgreSQL the bytes
        with unit_of_work(engine) as session:
            assert session.scalar(select(RecordIdentifier.keyed_hash)) == "0" * 64
    finally:
        engine.dispose()


def test_digests_decode_in_bounded_pieces_and_name_the_bad_row_in_a_later_piece(monkeypatch) -> None:  # noqa: ANN001
    import db.lineage

    monkeypatch.setattr(db.lineage, "_DECODE_ROWS", 3)
    digests = [bytes([i]) * 32 for i in range(10)]
    assert digests_from_hex(pa.array([d.hex() for d in digests])).to_pylist() == digests
    with pytest.raises(ValueError, match="row 7"):
        digests_from_hex(pa.array([d.hex() if i != 7 else "x" * 64 for i, d in enumerate(digests)]))
