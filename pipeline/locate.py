"""Locating a subject's records across a dataset's current shard versions.

Glue between the database (keyed identifier hashes -> records; which shard
version is current) and the pure ``dedup`` library (indexes, MinHash, FAISS).
A dry run (``erasure locate``) and a stored request use the same path.
"""

from __future__ import annotations

import hashlib
import hmac
import shutil
from collections.abc import Iterable
from pathlib import Path

import pyarrow.parquet as pq
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.lineage import get_dataset, latest_shard_versions
from db.models import Dataset, Record, RecordIdentifier
from db.settings import Settings
from dedup.embeddings import Embedder, get_embedder
from dedup.identifiers import keyed_hash
from dedup.locate import LocateRequest, LocateResult, SeedRecord, embedder_for, locate_matches
from dedup.minhash import MinHashKeyMismatch, MinHashParams
from dedup.policy import Thresholds
from dedup.shard_index import ShardIndex, artefact_dir, build_shard_index, texts_from_parquet
from dedup.tombstones import TombstoneSet, UnkeyedTombstones
from pipeline.artefact_cache import ARTEFACTS
from pipeline.object_store import shard_file
from shards.files import file_stamp, sha256_file
from shards.store import ShardVersionRef


def dataset_embedder(name: str, dim: int) -> Embedder:
    """The embedder a dataset was ingested with (its features are its vectors)."""
    return get_embedder(name, dim=dim) if name == "hashing" else get_embedder(name)


def dataset_minhash(settings: Settings, dataset: str) -> MinHashParams:
    """The dataset's keyed MinHash parameters, used by its shard indexes, tombstones and screening.

    Key: HMAC-SHA256(secret key, "minhash:" dataset name), so that each dataset's
    signatures are comparable only with its own and nobody without the secret key
    can compute the signature of a guessed text."""
    secret = settings.secret_key_bytes()
    return MinHashParams.keyed(hmac.new(secret, b"minhash:" + dataset.encode("utf-8"), hashlib.sha256).digest())


def build_and_save_index(ref: ShardVersionRef, embedder: Embedder, minhash: MinHashParams, table=None, *,
                         overwrite: bool = False) -> ShardIndex:
    """Indexes of one shard version, from its file (features are the stored embeddings)."""
    table = table if table is not None else pq.read_table(ref.path)
    features = table["features"].combine_chunks()
    vectors = features.values.to_numpy().reshape(len(features), -1) if len(features) else None
    index = build_shard_index(
        ref.shard,
        ref.version,
        table["record_id"].to_pylist(),
        table["text"].to_pylist(),
        table["slice"].to_numpy(),
        embedder=embedder,
        minhash=minhash,
        vectors=vectors if vectors is not None else None,
    )
    index.save(ref.path, overwrite=overwrite)
    return index


def remove_index(shard_version_path: str | Path) -> None:
    """Delete a shard version's locate indexes; an index already gone is fine, any
    other failure raises (the indexes name erased records: a purge must not pass silently)."""
    try:
        shutil.rmtree(artefact_dir(shard_version_path))
    except FileNotFoundError:
        pass


def load_index(path: str | Path, shard: int, version: int, embedder: Embedder, minhash: MinHashParams) -> ShardIndex:
    """The saved index of a shard version; rebuilt (and saved) if a crash left none, or if it was
    built under other MinHash parameters (an index from before keyed signatures: the upgrade)."""
    stale = False
    if artefact_dir(path).is_dir():
        try:
            return ShardIndex.load(path, minhash=minhash)
        except MinHashKeyMismatch:
            stale = True
    ref = ShardVersionRef("", shard, version, Path(path), sha256_file(path), 0)
    return build_and_save_index(ref, embedder, minhash, overwrite=stale)


def tombstone_path(settings: Settings, dataset: str) -> Path:
    return settings.home / "tombstones" / f"{dataset}.npz"


class UnkeyedTombstoneFile(RuntimeError):
    """The dataset's tombstone file predates keyed signatures; the operator must drop it explicitly."""


def refresh_shared_tombstones(settings: Settings, dataset: str) -> bool:
    """With a storage URL: bring this host's copy of the dataset's tombstones to the object the
    database names (fetched and verified when it changed; removed when none is named). False
    without a storage URL (the file in the home is the truth)."""
    from pipeline.database import open_database
    from pipeline.object_store import local_copy, object_store
    from db.session import unit_of_work

    if object_store(settings) is None:
        return False
    with unit_of_work(open_database(settings)) as session:
        url = session.scalar(select(Dataset.tombstones_url).where(Dataset.name == dataset))
    path = tombstone_path(settings, dataset)
    if url is None:
        path.unlink(missing_ok=True)
    else:
        local_copy(settings, url, None, path)
    return True


def load_tombstones(settings: Settings, dataset: str) -> TombstoneSet | None:
    """The dataset's tombstones under its keyed MinHash parameters; None if nothing was erased yet."""
    path = tombstone_path(settings, dataset)
    refresh_shared_tombstones(settings, dataset)
    if not path.exists():
        return None
    try:
        return TombstoneSet.load(path, dataset_minhash(settings, dataset))
    except UnkeyedTombstones as exc:
        raise UnkeyedTombstoneFile(
            f"{exc}: run `erasure db rekey --dataset {dataset} --drop-unkeyed-tombstones` "
            "(later re-ingests of those erased texts are then no longer screened out)") from None


def seeds_for_hashes(session: Session, dataset_id: int, hashes: Iterable[tuple[str, str]]) -> list[SeedRecord]:
    """Records (not yet erased) that carry one of the (kind, keyed hash) pairs."""
    seeds: list[SeedRecord] = []
    for kind, digest in hashes:
        rows = session.execute(
            select(Record.shard, Record.record_id)
            .join(
                RecordIdentifier,
                (RecordIdentifier.dataset_id == Record.dataset_id) & (RecordIdentifier.record_id == Record.record_id),
            )
            .where(
                RecordIdentifier.kind == kind,
                RecordIdentifier.keyed_hash == digest,
                RecordIdentifier.dataset_id == dataset_id,
                Record.erased_in_shard_version.is_(None),
            )
        ).all()
        seeds += [SeedRecord(shard, record_id, kind) for shard, record_id in rows]
    return seeds


def cached_index(settings: Settings, dataset: Dataset, shard: int, version: int, path: str,
                 embedder: Embedder, minhash: MinHashParams) -> ShardIndex:
    """The index of one shard version from the process's artefact cache (loaded on a miss).

    One entry per (home, dataset, shard): a newer version replaces the older one. The stamp
    holds the version, its file, the index manifest's identity and the MinHash key, so an
    index rebuilt in place (rekey) or of a superseded version is never served."""
    key = ("shard-index", str(settings.home), dataset.name, shard)
    manifest = artefact_dir(path) / "manifest.json"
    # Taken before loading: the content loaded is never older than the stamp it is stored under.
    stamp = (version, str(path), file_stamp(manifest), minhash.key_id)
    if stamp[2] is None:  # no index on disk (a crash left none): load_index builds and saves it
        built = _ready(load_index(path, shard, version, embedder, minhash))
        return ARTEFACTS.get(key, (version, str(path), file_stamp(manifest), minhash.key_id), lambda: built)
    return ARTEFACTS.get(key, stamp, lambda: _ready(load_index(path, shard, version, embedder, minhash)))


def parquet_metadata(path: str | Path):  # noqa: ANN201 - a pyarrow FileMetaData
    """The footer of a shard file, from the process's artefact cache (stamped with the file's
    identity: a shard version's file is never rewritten in place, an erasure writes a new one)."""
    import pyarrow.parquet as pq

    return ARTEFACTS.get(("parquet-metadata", str(path)), file_stamp(path), lambda: pq.read_metadata(path))


def _ready(index: ShardIndex) -> ShardIndex:
    """The index with its record-id -> row map built now, on load, not inside the first request
    that needs a row of it (about 25 ms per 125k-row shard)."""
    index.row("")
    return index


def current_indexes(settings: Settings, session: Session,
                    dataset: Dataset) -> tuple[dict[int, ShardIndex], dict[int, str], Embedder]:
    """The indexes of the dataset's latest shard versions (cached, see :func:`cached_index`),
    their files, and its embedder."""
    embedder = dataset_embedder(dataset.embedder, dataset.feature_dim)
    minhash = dataset_minhash(settings, dataset.name)
    versions = latest_shard_versions(session, dataset.id)
    # with a storage URL: each version fetched (verified) into this host's home; its index is built here
    files = {s: str(shard_file(settings, v, dataset.name, with_index=True)) for s, v in versions.items()}
    indexes = {s: cached_index(settings, dataset, s, v.version, files[s], embedder, minhash)
               for s, v in versions.items()}
    return indexes, files, embedder


def locate_in_dataset(
    settings: Settings,
    session: Session,
    dataset_name: str,
    *,
    identifier_hashes: Iterable[tuple[str, str]] = (),
    samples: tuple[str, ...] = (),
    thresholds: Thresholds | None = None,
    hops: int = 1,
    report_keep: bool = False,
    sample_only: str | None = None,
) -> LocateResult:
    """Every match of a subject (given as keyed identifier hashes and samples) in the current data.
    ``sample_only``: how matches reached only from a sample are decided (default: the settings',
    ``ERASURE_SAMPLE_ONLY_MATCHES``, review unless set)."""
    dataset = get_dataset(session, dataset_name)
    if dataset is None:
        raise LookupError(f"no dataset named {dataset_name!r}; ingest a file first")
    indexes, paths, embedder = current_indexes(settings, session, dataset)
    seeds = seeds_for_hashes(session, dataset.id, identifier_hashes)
    return locate_matches(
        LocateRequest(samples=samples),
        indexes,
        texts_from_parquet(paths, row_of=lambda shard, record_id: indexes[shard].row(record_id),
                           metadata_of=lambda shard: parquet_metadata(paths[shard])),
        seeds=seeds,
        embedder=embedder if embedder_for(indexes) is not None else None,
        thresholds=thresholds,
        hops=hops,
        report_keep=report_keep,
        sample_only=sample_only or settings.sample_only_matches,
    )


def locate_dry_run(
    settings: Settings,
    session: Session,
    dataset_name: str,
    request: LocateRequest,
    *,
    thresholds: Thresholds | None = None,
    hops: int = 1,
    report_keep: bool = False,
) -> LocateResult:
    """``erasure locate``: identifiers given in clear are hashed here, never stored."""
    key = settings.secret_key_bytes()
    hashes = [(kind, keyed_hash(key, kind, value)) for kind, value in request.identifiers]
    return locate_in_dataset(
        settings, session, dataset_name, identifier_hashes=hashes, samples=request.samples,
        thresholds=thresholds, hops=hops, report_keep=report_keep,
    )
