"""Typed SQLAlchemy 2 models of the lineage: dataset -> source file -> record ->
shard/slice -> shard version. The schema itself is created only by Alembic."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    TypeDecorator,
    BigInteger,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp with time zone that refuses naive datetimes and always reads
    back as aware UTC (SQLite keeps no offset, so values are stored in UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:  # noqa: ANN001
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass a timezone-aware time (UTC)")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:  # noqa: ANN001
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class HexDigest(TypeDecorator[str]):
    """A digest, lower-case hex in Python; on PostgreSQL stored as its bytes (``bytea``), elsewhere
    as the hex text. Why: half the bytes per key and per row on the server, where the identifier
    table holds three rows per record (a million records: about 100 MB less of table and key)."""

    impl = String(64)
    cache_ok = True

    def load_dialect_impl(self, dialect):  # noqa: ANN001, ANN201
        if dialect.name == "postgresql":
            return dialect.type_descriptor(LargeBinary())
        return dialect.type_descriptor(String(64))

    def process_bind_param(self, value: str | None, dialect) -> str | bytes | None:  # noqa: ANN001
        if value is None or dialect.name != "postgresql":
            return value
        if len(value) % 2 or value != value.lower():
            raise ValueError(f"a digest is lower-case hex, not {value[:70]!r}")
        return bytes.fromhex(value)

    def process_result_value(self, value: str | bytes | None, dialect) -> str | None:  # noqa: ANN001
        if value is None or isinstance(value, str):
            return value
        return bytes(value).hex()


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    n_shards: Mapped[int] = mapped_column(Integer)
    n_slices: Mapped[int] = mapped_column(Integer)
    feature_dim: Mapped[int] = mapped_column(Integer)
    embedder: Mapped[str] = mapped_column(String(100))
    key_id: Mapped[str] = mapped_column(String(32))
    # "subject" or "record" (shards.placement.PLACEMENT_MODES); fixed per dataset like the layout
    placement: Mapped[str] = mapped_column(String(16), default="record", server_default="record")
    # "integer" or "names" (class names through label_vocabulary), fixed at the first labelled ingest (0011)
    label_kind: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # with a storage URL: the object holding the current tombstones (0015); NULL: the file in the home
    tombstones_url: Mapped[str | None] = mapped_column(String(4096), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    source_files: Mapped[list[SourceFile]] = relationship(back_populates="dataset")


class SourceFile(Base):
    __tablename__ = "source_files"
    __table_args__ = (
        UniqueConstraint("dataset_id", "sha256", name="uq_source_files_dataset_sha256"),
        # The target of records' one foreign key, which also pins the dataset.
        UniqueConstraint("id", "dataset_id", name="uq_source_files_id_dataset"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="RESTRICT"))
    path: Mapped[str] = mapped_column(String(4096))
    sha256: Mapped[str] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(16))
    row_count: Mapped[int] = mapped_column(Integer)
    new_record_count: Mapped[int] = mapped_column(Integer)
    ingested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    dataset: Mapped[Dataset] = relationship(back_populates="source_files")


class Record(Base):
    """One training record. It lives in ``shard`` from shard version
    ``first_shard_version`` until (excluding) ``erased_in_shard_version``."""

    __tablename__ = "records"
    __table_args__ = (
        # Records erased, per shard and erasure (migration 0017): what purges, the sweep and the
        # lineage export look up. Live records are not in it, so ingest never maintains it.
        Index("ix_records_erased", "dataset_id", "shard", "erased_in_shard_version",
              postgresql_where=text("erased_in_shard_version IS NOT NULL"),
              sqlite_where=text("erased_in_shard_version IS NOT NULL")),
        # One foreign key (to the source file, which belongs to the dataset): each
        # foreign key is a per-row trigger during COPY, and bulk ingest is hot.
        ForeignKeyConstraint(
            ["source_file_id", "dataset_id"],
            ["source_files.id", "source_files.dataset_id"],
            ondelete="RESTRICT",
            name="fk_records_source_file",
        ),
    )

    dataset_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    record_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    shard: Mapped[int] = mapped_column(Integer)
    slice: Mapped[int] = mapped_column(Integer)
    # HMAC-SHA256(secret key, "content:" text), never a plain digest (which would confirm a guessed
    # text to anyone reading the table). NULL until rekeyed: rows from before migration 0006.
    content_hmac: Mapped[str | None] = mapped_column(String(64), nullable=True)
    source_file_id: Mapped[int] = mapped_column(Integer)
    row_number: Mapped[int] = mapped_column(Integer)
    first_shard_version: Mapped[int] = mapped_column(Integer)
    erased_in_shard_version: Mapped[int | None] = mapped_column(Integer, nullable=True)


class RecordIdentifier(Base):
    """A keyed hash (HMAC-SHA256) of one normalised identifier of a record; the
    raw value is never stored.

    The primary key (keyed_hash, kind, dataset_id, record_id) is also the lookup
    index of "which records carry this identifier". It leads with the hash,
    compared bytewise (migration 0014), and on PostgreSQL stored as its 32 bytes
    (``HexDigest``, migration 0017): sorting it for a bulk ingest's index build
    then mostly compares 8-byte prefixes of short keys. There is
    deliberately no foreign key to ``records``: it would be a per-row trigger that
    makes bulk ingest 3x slower; identifiers are written only by ingest, in the
    same transaction as their records (tests check that every one has its record).
    """

    __tablename__ = "record_identifiers"

    keyed_hash: Mapped[str] = mapped_column(HexDigest(), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    dataset_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    record_id: Mapped[str] = mapped_column(String(256), primary_key=True)


class ShardVersion(Base):
    __tablename__ = "shard_versions"
    __table_args__ = (UniqueConstraint("dataset_id", "shard", "version", name="uq_shard_versions_dataset_shard_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="RESTRICT"))
    shard: Mapped[int] = mapped_column(Integer)
    version: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(4096))
    sha256: Mapped[str] = mapped_column(String(64))
    row_count: Mapped[int] = mapped_column(Integer)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # set when the version's file and locate index were deleted because they held
    # erased records (migration 0004); the row stays as lineage
    files_purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # with a storage URL: the object holding the version's locate indexes (a tar; migration 0015)
    index_url: Mapped[str | None] = mapped_column(String(4096), nullable=True)


import db.requests  # noqa: E402,F401  (registers the request tables on Base.metadata for Alembic)
import db.training  # noqa: E402,F401  (registers the training and erasure tables on Base.metadata)
import db.audit  # noqa: E402,F401  (registers the audit log, certificates and probes)
import db.upstream  # noqa: E402,F401  (registers the upstream actions' done marks)
