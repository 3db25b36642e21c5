"""Bringing data from before keyed digests (migration 0006) under the secret key.

Migration 0006 set every ``records.content_hmac`` to NULL: it had plain SHA-256
digests, which confirm a guessed text to anyone reading the table, and no key to
compute HMACs with. What holds the key puts things right:

* :func:`rekey_live_records` (run by every ingest, and by ``erasure db rekey``):
  the HMAC of each live record whose digest is NULL, from its text in the
  latest shard file. Erased records stay NULL: their text is gone.
* :func:`rekey_dataset` (``erasure db rekey``): the above, the locate indexes of
  the latest shard versions rebuilt under the dataset's keyed MinHash parameters,
  a tombstone file of the unkeyed format dropped when the operator says so (it
  cannot be re-keyed: the erased texts are gone; until then ingest, erasure and
  screening refuse to run on it), and the database files compacted so that the
  old plain digests leave them (SQLite: WAL checkpoint + VACUUM; PostgreSQL:
  VACUUM FULL records).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import pyarrow.parquet as pq
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from db.audit import append_event
from db.lineage import DatasetConflict, get_dataset, latest_shard_versions
from db.locks import lock_dataset
from db.maintenance import after_erasure
from db.models import Dataset, Record
from db.session import unit_of_work
from db.settings import Settings
from dedup.identifiers import content_hmac, key_id
from dedup.minhash import MinHashParams
from dedup.shard_index import ShardIndex, artefact_dir
from dedup.tombstones import TombstoneSet, UnkeyedTombstones
from pipeline.database import open_database
from pipeline.object_store import shard_file
from pipeline.locate import (
    UnkeyedTombstoneFile,
    dataset_embedder,
    dataset_minhash,
    load_index,
    tombstone_path,
)
from shards.files import fsync_dir


@dataclass(frozen=True)
class RekeyReport:
    dataset: str
    records_rekeyed: int
    indexes_rebuilt: int
    unkeyed_tombstones_dropped: int

    def to_dict(self) -> dict:
        return asdict(self)


def rekey_live_records(session: Session, dataset: Dataset, key: bytes) -> int:
    """Set the content HMAC of the dataset's live records that have none, from their latest
    shard file; how many. The caller's transaction commits it."""
    missing = session.execute(
        select(Record.shard, Record.record_id).where(
            Record.dataset_id == dataset.id, Record.content_hmac.is_(None), Record.erased_in_shard_version.is_(None))
    ).all()
    if not missing:
        return 0
    by_shard: dict[int, list[str]] = {}
    for shard, record_id in missing:
        by_shard.setdefault(shard, []).append(record_id)
    versions = latest_shard_versions(session, dataset.id)
    values = []
    for shard, ids in sorted(by_shard.items()):
        if shard not in versions:
            raise RuntimeError(f"dataset {dataset.name!r}: {len(ids)} live records of shard {shard} but no shard "
                               "version: the lineage and the shard files disagree")
        table = pq.read_table(versions[shard].path, columns=["record_id", "text"])
        texts = dict(zip(table["record_id"].to_pylist(), table["text"].to_pylist()))
        absent = [rid for rid in ids if rid not in texts]
        if absent:
            raise RuntimeError(f"dataset {dataset.name!r}: {len(absent)} live records of shard {shard} are not in "
                               f"its latest version (first: {absent[0]!r}): the lineage and the shard file disagree")
        values += [{"dataset_id": dataset.id, "record_id": rid, "content_hmac": content_hmac(key, texts[rid])}
                   for rid in ids]
    session.execute(update(Record), values)  # bulk UPDATE by primary key
    return len(values)


def _index_is_current(path: str, minhash: MinHashParams) -> bool:
    if not artefact_dir(path).is_dir():
        return False
    try:
        return ShardIndex.load(path, mmap=True).minhash == minhash
    except (ValueError, FileNotFoundError):
        return False


def rekey_dataset(settings: Settings, dataset_name: str, *, drop_unkeyed_tombstones: bool = False,
                  engine: Engine | None = None) -> RekeyReport:
    """Keyed digests, keyed indexes and keyed tombstones for one dataset (idempotent)."""
    engine = engine if engine is not None else open_database(settings)
    key = settings.secret_key_bytes()
    minhash = dataset_minhash(settings, dataset_name)
    with unit_of_work(engine) as session:
        dataset = get_dataset(session, dataset_name)
        if dataset is None:
            raise LookupError(f"no dataset named {dataset_name!r}")
        if dataset.key_id != key_id(key):
            raise DatasetConflict(f"dataset {dataset_name!r} was ingested with another secret key (key id "
                                  f"{dataset.key_id}, now {key_id(key)}): restore the original ERASURE_SECRET_KEY")
        lock_dataset(session, dataset.id)
        # First the tombstones: an unkeyed file without the operator's consent stops everything.
        dropped = 0
        path = tombstone_path(settings, dataset_name)
        if path.exists():
            try:
                TombstoneSet.load(path, minhash)
            except UnkeyedTombstones as exc:
                if not drop_unkeyed_tombstones:
                    raise UnkeyedTombstoneFile(
                        f"{exc}: run again with --drop-unkeyed-tombstones (later re-ingests of those erased texts "
                        "are then no longer screened out)") from None
                dropped = exc.count
        records = rekey_live_records(session, dataset, key)
        embedder = dataset_embedder(dataset.embedder, dataset.feature_dim)
        rebuilt = 0
        for shard, version in sorted(latest_shard_versions(session, dataset.id).items()):
            file = shard_file(settings, version, dataset_name)  # a storage URL: this host's copy and index
            if not _index_is_current(file, minhash):
                load_index(file, shard, version.version, embedder, minhash)  # rebuilds and saves
                rebuilt += 1
        report = RekeyReport(dataset_name, records, rebuilt, dropped)
        append_event(session, "dataset.rekeyed", report.to_dict(), actor="cli:rekey")
        if dropped:
            os.unlink(path)
            fsync_dir(path.parent)
    compact_database(engine)
    return report


def compact_database(engine: Engine) -> None:
    """Rewrite the records table so that values set to NULL leave the database files."""
    after_erasure(engine, vacuum=True, tables=("records",), lock_timeout=None)


def rekey_all(settings: Settings, *, drop_unkeyed_tombstones: bool = False) -> list[RekeyReport]:
    """:func:`rekey_dataset` for every dataset."""
    engine = open_database(settings)
    with unit_of_work(engine) as session:
        names = list(session.scalars(select(Dataset.name).order_by(Dataset.name)))
    return [rekey_dataset(settings, name, drop_unkeyed_tombstones=drop_unkeyed_tombstones, engine=engine)
            for name in names]
