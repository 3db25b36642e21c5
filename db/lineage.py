"""Lineage writes and reads: datasets, source files, records, identifiers,
shard versions. Bulk inserts use binary COPY on PostgreSQL and executemany elsewhere;
``lineage_bulk_load`` decides whether PostgreSQL maintains the two tables' keys
row by row or rebuilds them set-wise after the load."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING

from sqlalchemy import BigInteger, Integer, String, func, insert, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from db.models import Dataset, HexDigest, Record, RecordIdentifier, ShardVersion, SourceFile

if TYPE_CHECKING:  # pyarrow only where rows are bulk-loaded: audit and request commands never import it
    import pyarrow as pa

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
# keyed_hash in the Arrow rows of a bulk insert: the digest's 32 bytes (``digests_from_hex``)
IDENTIFIER_COLUMNS = ("dataset_id", "record_id", "kind", "keyed_hash")
DIGEST_BYTES = 32
_COPY_CHUNK_ROWS = 65_536
_DECODE_ROWS = 262_144


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


def bulk_insert(session: Session, table: str, rows: pa.Table) -> int:
    """Insert ``rows`` (an Arrow table with the columns ``RECORD_COLUMNS`` or ``IDENTIFIER_COLUMNS``)
    into ``records`` or ``record_identifiers`` inside the session's transaction.

    PostgreSQL: one binary COPY (``db.pg_binary_copy``: no Python object per value; the keyed
    hashes go as their bytes), each column's wire type read off the model. Rows in primary-key
    order insert fastest into maintained keys (the index grows at its end), and a rebuilt key's
    sort finds them presorted. Elsewhere: executemany in batches."""
    columns = RECORD_COLUMNS if table == "records" else IDENTIFIER_COLUMNS
    if tuple(rows.column_names) != columns:
        raise ValueError(f"bulk_insert into {table} takes the columns {columns}, not {tuple(rows.column_names)}")
    model = {"records": Record, "record_identifiers": RecordIdentifier}[table]
    digests = [name for name in columns if isinstance(model.__table__.c[name].type, HexDigest)]
    for name in digests:
        if rows.schema.field(name).type != _digest_type():
            raise ValueError(f"bulk_insert: {name} takes {DIGEST_BYTES}-byte digests (digests_from_hex), "
                             f"not {rows.schema.field(name).type}")
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        from psycopg.copy import QueuedLibpqWriter

        from db.pg_binary_copy import binary_copy_chunks

        kinds = [_wire_kind(model.__table__.c[name].type) for name in columns]
        cursor = connection.connection.driver_connection.cursor()
        # A writer thread sends while this one encodes the next chunk: the server's parsing overlaps ours.
        with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT binary)",
                         writer=QueuedLibpqWriter(cursor)) as copy:
            for chunk in binary_copy_chunks(rows, kinds, _COPY_CHUNK_ROWS):
                copy.write(chunk)
        return rows.num_rows
    for start in range(0, rows.num_rows, 20_000):
        batch = rows.slice(start, 20_000).to_pylist()
        for row in batch:  # stored as hex text here (HexDigest)
            for name in digests:
                row[name] = row[name].hex()
        session.execute(insert(model), batch)
    return rows.num_rows


def _digest_type() -> pa.DataType:
    import pyarrow as pa

    return pa.binary(DIGEST_BYTES)


def digests_from_hex(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """64-character lower-case hex digests (one Arrow string per row) as their 32 bytes each
    (``fixed_size_binary(32)``), in the same order: bytewise, lower-case hex sorts as the bytes it
    spells. Raises ValueError naming the first row that is not such a digest. Two characters are
    decoded per table lookup (a 64k-entry table): about 0.15 s per 582k digests."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_string(column.type):
        raise ValueError(f"hex digests are Arrow strings, not {column.type}")
    n, width = len(column), 2 * DIGEST_BYTES
    if not n:
        return pa.array([], _digest_type())
    lengths = pc.binary_length(column)
    extremes = pc.min_max(lengths)
    if column.null_count or extremes["min"].as_py() != width or extremes["max"].as_py() != width:
        raise ValueError(f"not a {width}-character hex digest: row {_first(pc.not_equal(lengths, width))}")
    start = np.frombuffer(column.buffers()[1], dtype=np.int32, count=1, offset=column.offset * 4)[0]
    pairs = np.frombuffer(column.buffers()[2], dtype="<u2", count=n * DIGEST_BYTES, offset=int(start))
    digests = np.empty(n * DIGEST_BYTES, dtype=np.uint8)
    step = _DECODE_ROWS * DIGEST_BYTES  # a bounded temporary (2 bytes per output byte), not one per column
    for at in range(0, len(pairs), step):
        values = _hex_pair_values()[pairs[at:at + step]]
        if values.max() > 255:
            bad = values.reshape(-1, DIGEST_BYTES).max(axis=1) > 255
            raise ValueError(f"not lower-case hex: row {at // DIGEST_BYTES + _first(pa.array(bad))}")
        digests[at:at + step] = values
    return pa.Array.from_buffers(_digest_type(), n, [None, pa.py_buffer(digests)])


def _first(mask: pa.Array) -> int:
    import pyarrow.compute as pc

    return int(pc.index(mask.fill_null(True), True).as_py())


@cache
def _hex_pair_values():  # noqa: ANN202 (a constant, built on first use: numpy is imported lazily)
    """Byte value of every two-character lower-case hex string read as a little-endian uint16; 0xFFFF
    for every other pair of bytes."""
    import numpy as np

    table = np.full(65536, 0xFFFF, dtype=np.uint16)
    digits = b"0123456789abcdef"
    for high, a in enumerate(digits):
        for low, b in enumerate(digits):
            table[a | (b << 8)] = 16 * high + low
    return table


def _wire_kind(column_type: object) -> str:
    """How ``db.pg_binary_copy`` sends a value of this model column type."""
    if isinstance(column_type, HexDigest):
        return "bytea"
    if isinstance(column_type, BigInteger) or not isinstance(column_type, (Integer, String)):
        raise TypeError(f"no binary COPY encoding for {column_type!r}")
    return "int4" if isinstance(column_type, Integer) else "text"


LINEAGE_TABLES = ("records", "record_identifiers")
_LOCK_NOT_AVAILABLE = "55P03"
# Index builds sort in memory up to this (per build, this transaction only); the server default 64MB
# spills a million identifier rows to disk.
_REBUILD_MAINTENANCE_WORK_MEM = "256MB"


@contextmanager
def lineage_bulk_load(session: Session, new_records: int) -> Iterator[str]:
    """The block bulk-inserts ``new_records`` records (and their identifiers) in the session's
    transaction; yields how their keys are kept: ``"incremental"`` or ``"rebuild"``.

    Why: on PostgreSQL a COPY into ``records`` and ``record_identifiers`` spends most of its time
    maintaining their B-trees one row at a time (a descent per row and index) and in the per-row
    trigger of ``fk_records_source_file`` (an index probe and a row lock per record); into unindexed
    tables the same rows load 4-6x faster. So when the rows coming outnumber those already there
    (a first ingest, a large one into a small database), their primary keys, unique constraints,
    indexes and foreign keys are dropped, the rows loaded, and the same definitions (read from the
    catalog, so the schema stays exactly the migrations') created again: each index built by one
    sort, each key's uniqueness and each foreign key checked over the whole table in one pass. A
    duplicate key or a record naming a missing source file fails that check with PostgreSQL's own
    error, and the transaction rolls back whole, the dropped definitions included (DDL is
    transactional): nothing half-written, and the schema as before.

    The drop needs ACCESS EXCLUSIVE locks on both tables (readers wait until the ingest commits) and
    SHARE ROW EXCLUSIVE on ``source_files``; they are taken with NOWAIT, before anything waits on
    them, so a reader or writer already there makes this ingest keep the keys incremental instead
    of waiting (and nobody deadlocks on us). Otherwise (appends to a bigger table, SQLite) rows are
    inserted with the keys in place: rebuilding would re-sort every row already there.
    """
    if session.connection().dialect.name != "postgresql" or not _fewer_rows_than(session, "records", new_records):
        yield "incremental"
        return
    if not _lock_for_rebuild(session):
        yield "incremental"
        return
    constraints, indexes = _key_definitions(session)
    for table, name, _ in reversed(constraints):  # foreign keys (listed last) before the keys they may use
        session.execute(text(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"'))
    for name, _ in indexes:
        session.execute(text(f'DROP INDEX "{name}"'))
    yield "rebuild"
    session.execute(text(f"SET LOCAL maintenance_work_mem = '{_REBUILD_MAINTENANCE_WORK_MEM}'"))
    for table, name, definition in constraints:
        session.execute(text(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}'))
    for _, definition in indexes:
        session.execute(text(definition))


def _lock_for_rebuild(session: Session) -> bool:
    """Take the rebuild's locks now, or (someone holds a conflicting one) none, without waiting."""
    savepoint = session.begin_nested()
    try:
        session.execute(text("LOCK TABLE records, record_identifiers IN ACCESS EXCLUSIVE MODE NOWAIT"))
        session.execute(text("LOCK TABLE source_files IN SHARE ROW EXCLUSIVE MODE NOWAIT"))
    except OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
            raise
        savepoint.rollback()
        return False
    savepoint.commit()
    return True


def _fewer_rows_than(session: Session, table: str, n: int) -> bool:
    """Whether ``table`` holds fewer than ``n`` rows, reading at most ``n`` of them."""
    held = session.scalar(text(f"SELECT count(*) FROM (SELECT 1 FROM {table} LIMIT :n) AS held"), {"n": n})
    return held < n


def _key_definitions(session: Session) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """The lineage tables' constraints that an insert checks per row — (table, name, definition),
    primary keys and unique constraints before foreign keys — and their other indexes (name, CREATE)."""
    constraints = session.execute(text(
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = ANY(CAST(:tables AS regclass[])) AND contype IN ('p', 'u', 'x', 'f') "
        "ORDER BY contype = 'f', conrelid::regclass::text, conname"
    ), {"tables": list(LINEAGE_TABLES)}).all()
    indexes = session.execute(text(
        "SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE i.indrelid = ANY(CAST(:tables AS regclass[])) "
        "AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid AND k.conrelid = i.indrelid) "
        "ORDER BY c.relname"
    ), {"tables": list(LINEAGE_TABLES)}).all()
    return [tuple(row) for row in constraints], [tuple(row) for row in indexes]


def count_rows(session: Session, model: type) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0
