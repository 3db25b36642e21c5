"""Lineage writes and reads: datasets, source files, records, identifiers,
shard versions. Bulk inserts use COPY on PostgreSQL and executemany elsewhere."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from db.models import Dataset, Record, RecordIdentifier, ShardVersion, SourceFile

RECORD_COLUMNS = (
    "dataset_id",
    "record_id",
    "shard",
    "slice",
    "content_hmac",
    "source_file_id",
    "row_number",
    "first_shard_version",
)
IDENTIFIER_COLUMNS = ("dataset_id", "record_id", "kind", "keyed_hash")
# PostgreSQL types of the columns above, for binary COPY (no text formatting or parsing of each value).
_COPY_TYPES = {
    "records": ("int4", "varchar", "int4", "int4", "varchar", "int4", "int4", "int4"),
    "record_identifiers": ("int4", "varchar", "varchar", "varchar"),
}


class DatasetConflict(ValueError):
    """An ingest asks for a layout or key that differs from the dataset's."""


def get_dataset(session: Session, name: str) -> Dataset | None:
    return session.scalars(select(Dataset).where(Dataset.name == name)).one_or_none()


def ensure_dataset(
    session: Session,
    *,
    name: str,
    seed: int,
    n_shards: int,
    n_slices: int,
    feature_dim: int,
    embedder: str,
    key_id: str,
    placement: str | None = None,
) -> Dataset:
    """The dataset named ``name``, created if new; its fixed layout (and placement, when given) must match."""
    dataset = get_dataset(session, name)
    if dataset is None:
        dataset = Dataset(
            name=name,
            seed=seed,
            n_shards=n_shards,
            n_slices=n_slices,
            feature_dim=feature_dim,
            embedder=embedder,
            key_id=key_id,
            placement=placement or "record",
        )
        session.add(dataset)
        session.flush()
        return dataset
    wanted = {"seed": seed, "n_shards": n_shards, "n_slices": n_slices, "feature_dim": feature_dim, "embedder": embedder}
    if placement is not None:
        wanted["placement"] = placement
    for attr, value in wanted.items():
        if getattr(dataset, attr) != value:
            raise DatasetConflict(
                f"dataset {name!r} was created with {attr}={getattr(dataset, attr)}, not {value}; "
                "use the same settings or a new --dataset name"
            )
    if dataset.key_id != key_id:
        raise DatasetConflict(
            f"dataset {name!r} was ingested with a different secret key (key id {dataset.key_id}, now {key_id}); "
            "identifier hashes would not match: restore the original ERASURE_SECRET_KEY"
        )
    return dataset


def find_source_file(session: Session, dataset_id: int, sha256: str) -> SourceFile | None:
    return session.scalars(
        select(SourceFile).where(SourceFile.dataset_id == dataset_id, SourceFile.sha256 == sha256)
    ).one_or_none()


def record_contents(session: Session, dataset_id: int) -> dict[str, str | None]:
    """record id -> content HMAC for every record of the dataset ever ingested (None: not rekeyed,
    see ``pipeline.rekey``)."""
    rows = session.execute(
        select(Record.record_id, Record.content_hmac).where(Record.dataset_id == dataset_id)
    ).all()
    return {record_id: sha for record_id, sha in rows}


def add_source_file(
    session: Session, *, dataset_id: int, path: str, sha256: str, fmt: str, row_count: int, new_record_count: int
) -> SourceFile:
    source = SourceFile(
        dataset_id=dataset_id, path=path, sha256=sha256, format=fmt, row_count=row_count, new_record_count=new_record_count
    )
    session.add(source)
    session.flush()
    return source


def add_shard_version(
    session: Session, *, dataset_id: int, shard: int, version: int, path: str, sha256: str, row_count: int, created_by: str,
    index_url: str | None = None,
) -> ShardVersion:
    row = ShardVersion(
        dataset_id=dataset_id, shard=shard, version=version, path=path, sha256=sha256, row_count=row_count, created_by=created_by,
        index_url=index_url,
    )
    session.add(row)
    session.flush()
    return row


def latest_shard_versions(session: Session, dataset_id: int) -> dict[int, ShardVersion]:
    """shard -> its newest recorded version."""
    newest = (
        select(ShardVersion.shard, func.max(ShardVersion.version).label("version"))
        .where(ShardVersion.dataset_id == dataset_id)
        .group_by(ShardVersion.shard)
        .subquery()
    )
    rows = session.scalars(
        select(ShardVersion).join(
            newest, (ShardVersion.shard == newest.c.shard) & (ShardVersion.version == newest.c.version)
        ).where(ShardVersion.dataset_id == dataset_id)
    )
    return {row.shard: row for row in rows}


def bulk_insert(session: Session, table: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> int:
    """Insert rows (tuples in ``columns`` order) into ``records`` or
    ``record_identifiers`` inside the session's transaction; binary COPY on
    PostgreSQL (rows in primary-key order insert fastest: the index grows at its end)."""
    model = {"records": Record, "record_identifiers": RecordIdentifier}[table]
    connection = session.connection()
    count = 0
    if connection.dialect.name == "postgresql":
        if tuple(columns) != (RECORD_COLUMNS if table == "records" else IDENTIFIER_COLUMNS):
            raise ValueError(f"bulk_insert into {table} takes its columns in the order of db.lineage's constants")
        from psycopg.copy import QueuedLibpqWriter

        cursor = connection.connection.driver_connection.cursor()
        # A writer thread sends while this one formats rows: the server's index and key work overlaps ours.
        with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)",
                         writer=QueuedLibpqWriter(cursor)) as copy:
            copy.set_types(list(_COPY_TYPES[table]))
            for row in rows:
                copy.write_row(row)
                count += 1
        return count
    batch: list[dict[str, object]] = []
    for row in rows:
        batch.append(dict(zip(columns, row)))
        if len(batch) >= 20_000:
            session.execute(insert(model), batch)
            count += len(batch)
            batch = []
    if batch:
        session.execute(insert(model), batch)
        count += len(batch)
    return count


def count_rows(session: Session, model: type) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0
