"""The erasure steps of a request, as plain functions over our database: record
the located matches, apply review verdicts, erase per shard, verify.

Every function is idempotent: it reads what is done from the database (the
request's matches, ``records.erased_in_shard_version``, shard versions) and
does only the rest, so a process killed at any point can simply run again.

Per-shard serialisation. ``erase_from_shard`` runs in one transaction that
first takes the shard's lock: ``pg_advisory_xact_lock`` on PostgreSQL (held
until commit), so two requests erasing from one shard queue up and the second
writes its version on top of the first's — neither deletion is lost. SQLite
has a single writer per database file (a write transaction blocks the next),
which is enough for the embedded default of one process; run one worker
against a SQLite database.

Crash safety of a shard rewrite: the new version file is written (and fsynced)
before the transaction that records it commits. Killed in between, the file
exists unrecorded; the next run finds it, checks that it holds exactly the
base version minus the records to erase, and adopts it instead of writing
another (otherwise ``write_version`` takes the next free number: no version is
ever overwritten).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pyarrow.parquet as pq
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from db.audit import append_event
from db.lineage import add_shard_version, get_dataset, latest_shard_versions
from db.locks import lock_dataset, lock_shard
from db.models import Dataset, Record, ShardVersion, utcnow
from db.requests import ErasureRequest
from db.session import unit_of_work
from db.settings import Settings
from db.training import JOB_DONE, JOB_PENDING, Checkpoint, EnsembleMemberRow, RequestMatch, ShardRetrainJob
from pipeline.lifecycle import get_request, identifier_hashes, review_verdicts, sample_texts
from pipeline.object_store import delete_object, home_path_of, is_object_url, publish_file, publish_index
from pipeline.object_store import shard_file, shard_version_home_path
from shards.files import write_atomically
from shards.store import ShardStore, ShardVersionRef

ERASE = "erase"
KEEP = "keep"
REVIEW = "review"
KILL_ENV = "ERASURE_FAULT_KILL_AT"  # fault injection for the crash tests: the step boundary to die at



# ---------------------------------------------------------------- fault injection


def crash_point(name: str) -> None:
    """Die with SIGKILL here when ``$ERASURE_FAULT_KILL_AT`` names this step boundary.

    Only the crash tests set it: they kill the process at each boundary and
    check that running the flow again reaches the same final state.
    """
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- helpers


def dataset_or_fail(session: Session, name: str) -> Dataset:
    dataset = get_dataset(session, name)
    if dataset is None:
        raise LookupError(f"no dataset named {name!r}; ingest a file first")
    return dataset


def match_ref(shard: int, record_id: str) -> str:
    """How reviewers name a match: ``<shard>/<record id>``."""
    return f"{shard}/{record_id}"


def request_matches(session: Session, request_id: str, dataset_id: int | None = None) -> list[RequestMatch]:
    query = select(RequestMatch).where(RequestMatch.request_id == str(request_id))
    if dataset_id is not None:
        query = query.where(RequestMatch.dataset_id == dataset_id)
    return list(session.scalars(query.order_by(RequestMatch.shard, RequestMatch.record_id)))


# ---------------------------------------------------------------- locate + record


def locate_for_request(settings: Settings, session: Session, request_id: str, dataset: str):
    """The request's matches in the dataset's current shard versions (a LocateResult)."""
    from pipeline.locate import locate_in_dataset

    return locate_in_dataset(
        settings, session, dataset,
        identifier_hashes=identifier_hashes(session, request_id),
        samples=tuple(sample_texts(session, request_id)),
    )


def record_matches(session: Session, request_id: str, dataset_id: int, matches) -> dict[str, int]:  # noqa: ANN001
    """Store the located matches (erase and review; keep is not stored).
    Idempotent: a match already recorded for the request is left as it is."""
    existing = {(m.shard, m.record_id) for m in request_matches(session, request_id, dataset_id)}
    counts = {ERASE: 0, REVIEW: 0}
    by_method: dict[str, int] = {}
    sample_only = 0
    for match in matches:
        decision = match.decision.value
        if decision == KEEP or (match.shard, match.record_id) in existing:
            continue
        session.add(RequestMatch(
            request_id=str(request_id), dataset_id=dataset_id, match_ref=match_ref(match.shard, match.record_id),
            shard=match.shard, shard_version=match.shard_version, slice=match.slice, record_id=match.record_id,
            method=match.method.value, metric=match.metric.value, score=float(match.score), decision=decision,
            hop=match.hop, query=match.query[:300], final_decision=ERASE if decision == ERASE else None,
            provenance=match.provenance.value, found_at=utcnow(),
            paraphrase_evidence=(None if match.paraphrase is None
                                 else json.dumps(match.paraphrase.numbers(), sort_keys=True, allow_nan=False)),
        ))
        sample_only += match.provenance.value == "sample"
        existing.add((match.shard, match.record_id))
        counts[decision] += 1
        by_method[match.method.value] = by_method.get(match.method.value, 0) + 1
    session.flush()
    if counts[ERASE] or counts[REVIEW]:
        append_event(session, "matches.recorded", {"dataset_id": dataset_id, "erase": counts[ERASE],
                                                   "review": counts[REVIEW], "by_method": by_method,
                                                   "sample_only": sample_only},
                     actor="flow:locate", request_id=str(request_id))
    return counts


def apply_review_verdicts(session: Session, request_id: str) -> int:
    """Copy reviewers' verdicts onto the borderline matches; returns how many still wait."""
    verdicts = review_verdicts(session, request_id)
    waiting = 0
    for match in request_matches(session, request_id):
        if match.decision != REVIEW or match.erased_in_shard_version is not None:
            continue
        verdict = verdicts.get(match.match_ref)
        if verdict in (ERASE, KEEP):
            match.final_decision = verdict
        else:
            waiting += 1
    session.flush()
    return waiting


def undecided_refs(session: Session, request_id: str) -> list[str]:
    return [m.match_ref for m in request_matches(session, request_id) if m.final_decision is None]


def resolve_undecided(session: Session, request_id: str, decision: str) -> int:
    """The review timeout policy ``keep``/``erase``: decide what no reviewer did."""
    count = 0
    for match in request_matches(session, request_id):
        if match.final_decision is None:
            match.final_decision = decision
            count += 1
    session.flush()
    return count


# ---------------------------------------------------------------- erase


@dataclass(frozen=True)
class ShardErasure:
    shard: int
    erased: int  # records removed by this request's new shard version
    already_erased: int  # records another request had removed (not erased twice)
    new_version: int | None
    retrain_job_id: int | None

    def to_dict(self) -> dict:
        return {"shard": self.shard, "erased": self.erased, "already_erased": self.already_erased,
                "new_version": self.new_version, "retrain_job_id": self.retrain_job_id}


def shards_to_erase(session: Session, request_id: str, dataset_id: int) -> list[int]:
    return sorted({m.shard for m in request_matches(session, request_id, dataset_id)
                   if m.final_decision == ERASE and m.erased_in_shard_version is None})


def erase_from_shard(settings: Settings, engine: Engine, request_id: str, dataset_name: str, shard: int) -> ShardErasure:
    """Remove the request's records from one shard: a new shard version without
    them, its indexes, tombstones, lineage, and a pending retraining. One
    transaction under the shard's lock; a rerun does only what is left."""
    store = ShardStore(settings.shards_dir)
    with unit_of_work(engine) as session:
        dataset = dataset_or_fail(session, dataset_name)
        lock_shard(session, dataset.id, shard)
        request = get_request(session, request_id)
        todo = [m for m in request_matches(session, request_id, dataset.id)
                if m.shard == shard and m.final_decision == ERASE and m.erased_in_shard_version is None]
        if not todo:
            return ShardErasure(shard, 0, 0, None, None)
        records = {r.record_id: r for r in session.scalars(
            select(Record).where(Record.dataset_id == dataset.id, Record.record_id.in_([m.record_id for m in todo]))
        )}
        # Records another request erased meanwhile: not erased twice; this match waits for that retraining.
        done_before = [m for m in todo if records[m.record_id].erased_in_shard_version is not None]
        for m in done_before:
            m.erased_in_shard_version = records[m.record_id].erased_in_shard_version
            m.retrain_job_id = _job_of_erased_record(session, dataset.id, m.record_id)
        remove = sorted(m.record_id for m in todo if records[m.record_id].erased_in_shard_version is None)
        new_version = job_id = None
        if remove:
            base = latest_shard_versions(session, dataset.id)[shard]
            base_file = shard_file(settings, base, dataset_name)  # with a storage URL: fetched, verified
            ref = _write_or_adopt(store, dataset_name, shard, base, remove, base_file)
            crash_point("erase:after_shard_file")
            update_indexes_and_tombstones(settings, session, dataset, shard, base, ref, remove, request_id)
            # With a storage URL the new version's object is uploaded now; the row naming it makes it live.
            add_shard_version(session, dataset_id=dataset.id, shard=shard, version=ref.version,
                              path=publish_file(settings, ref.path, ref.sha256),
                              index_url=publish_index(settings, ref.path),
                              sha256=ref.sha256, row_count=ref.row_count, created_by=f"erasure:request:{request_id}")
            for rid in remove:
                records[rid].erased_in_shard_version = ref.version
            job_id = _pending_job(session, dataset.id, shard, request.due_at) if _shard_is_trained(session, dataset.id, shard) else None
            for m in todo:
                if m.record_id in remove:
                    m.erased_in_shard_version = ref.version
                    m.retrain_job_id = job_id
            new_version = ref.version
            append_event(session, "shard.erased", {
                "dataset": dataset_name, "shard": shard, "from_version": base.version, "to_version": ref.version,
                "to_sha256": ref.sha256, "records_erased": len(remove), "already_erased": len(done_before),
                "retrain_job_id": job_id,
            }, actor="flow:erase", request_id=str(request_id))
        session.flush()
        return ShardErasure(shard, len(remove), len(done_before), new_version, job_id)


def _write_or_adopt(store: ShardStore, dataset: str, shard: int, base: ShardVersion, remove: list[str],
                    base_file: Path | None = None) -> ShardVersionRef:
    """The shard version ``base`` minus ``remove``, under the shard's lock.

    Version files above the recorded ``base`` are unrecorded. The next one, left by
    a killed run of this step, is adopted when it holds exactly that. Any other
    whose writer is gone is deleted with its locate indexes: it holds records (the
    erased ones too, if an ingest wrote it from an older version) that no row names,
    and kept it would hold them forever. One whose writer still runs (an ingest
    that records its versions after writing them all) is left: that ingest finds
    the shard changed and rolls its file back; we take the next free number."""
    from pipeline.locate import remove_index

    removed = set(remove)
    for stray in store.version_files_after(dataset, shard, base.version):
        if stray == store.path_of(dataset, shard, base.version + 1):
            base_ids = pq.read_table(base_file or base.path, columns=["record_id"])["record_id"].to_pylist()
            stray_ids = pq.read_table(stray, columns=["record_id"])["record_id"].to_pylist()
            if stray_ids == [rid for rid in base_ids if rid not in removed]:
                return ShardVersionRef(dataset, shard, base.version + 1, stray, _sha256(stray), len(stray_ids))
        if store.writer_may_be_in_flight(stray):
            continue
        remove_index(stray)
        store.remove_stray_version(stray)
    return store.write_without(dataset, shard, remove, base_version=base.version)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def update_indexes_and_tombstones(
    settings: Settings, session: Session, dataset: Dataset, shard: int, base: ShardVersion,
    new: ShardVersionRef, removed_ids: list[str], request_id: str,
) -> None:
    """The locate indexes of the new shard version (the base's minus the records) and
    the removed records' MinHash signatures added to the dataset's tombstones, keyed
    ``<request id>/<shard>/<record id>`` (a key already present is not added again).

    Both are idempotent: an index directory already written is kept; tombstone
    keys present are skipped. The tombstone file is shared by the dataset's shards,
    so its update takes the dataset lock (PostgreSQL) until the transaction ends.
    """
    from dedup.shard_index import artefact_dir
    from dedup.tombstones import TombstoneSet
    from pipeline.locate import dataset_embedder, dataset_minhash, load_index, load_tombstones, tombstone_path

    embedder = dataset_embedder(dataset.embedder, dataset.feature_dim)
    # Keyed MinHash parameters: the tombstones confirm nothing to whoever lacks the secret key.
    base_file = shard_file(settings, base, dataset.name, with_index=True)  # a storage URL: this host's verified copy
    base_index = load_index(base_file, shard, base.version, embedder, dataset_minhash(settings, dataset.name))
    new_index, removed = base_index.without(removed_ids, new.version)
    if not artefact_dir(new.path).is_dir():
        new_index.save(new.path)
    lock_dataset(session, dataset.id)
    tombstones = load_tombstones(settings, dataset.name) or TombstoneSet.empty(removed.minhash)
    present = set(tombstones.keys)
    keys = [f"{request_id}/{shard}/{rid}" for rid in removed.record_ids]
    fresh = [i for i, key in enumerate(keys) if key not in present]
    if fresh:
        tombstones = tombstones.added(removed.signatures[fresh], [keys[i] for i in fresh], removed.minhash)
        path = write_atomically(tombstone_path(settings, dataset.name), tombstones.to_bytes())
        if is_object_url(published := publish_file(settings, path)):
            dataset.tombstones_url = published  # the new tombstones are live when this transaction commits


def _shard_is_trained(session: Session, dataset_id: int, shard: int) -> bool:
    """Whether the ensemble in service has a sub-model of the shard (then it must be retrained)."""
    from pipeline.training import current_ensemble_row
    from db.training import EnsembleMemberRow

    current = current_ensemble_row(session, dataset_id)
    if current is None:
        return False
    return session.get(EnsembleMemberRow, (current.id, shard)) is not None


def _pending_job(session: Session, dataset_id: int, shard: int, due_at: datetime) -> int:
    """The shard's pending retraining job (created if none), its due date the earliest served."""
    job = session.scalars(
        select(ShardRetrainJob).where(
            ShardRetrainJob.dataset_id == dataset_id, ShardRetrainJob.shard == shard, ShardRetrainJob.status == JOB_PENDING
        ).order_by(ShardRetrainJob.id)
    ).first()
    if job is None:
        job = ShardRetrainJob(dataset_id=dataset_id, shard=shard, status=JOB_PENDING, due_at=due_at, created_at=utcnow())
        session.add(job)
        session.flush()
    elif due_at < job.due_at:
        job.due_at = due_at
    return job.id


def _job_of_erased_record(session: Session, dataset_id: int, record_id: str) -> int | None:
    return session.scalars(
        select(RequestMatch.retrain_job_id).where(
            RequestMatch.dataset_id == dataset_id, RequestMatch.record_id == record_id,
            RequestMatch.erased_in_shard_version.is_not(None), RequestMatch.retrain_job_id.is_not(None),
        ).order_by(RequestMatch.id)
    ).first()


# ---------------------------------------------------------------- retraining status, verification


def request_jobs(session: Session, request_id: str) -> list[ShardRetrainJob]:
    ids = sorted({m.retrain_job_id for m in request_matches(session, request_id) if m.retrain_job_id is not None})
    if not ids:
        return []
    return list(session.scalars(select(ShardRetrainJob).where(ShardRetrainJob.id.in_(ids)).order_by(ShardRetrainJob.id)))


def retraining_done(session: Session, request_id: str) -> bool:
    return all(job.status == JOB_DONE for job in request_jobs(session, request_id))


def erased_record_ids(session: Session, request_id: str, dataset_id: int | None = None) -> list[str]:
    """The request's erased record ids (of one dataset when given: ids are unique only within a dataset)."""
    return sorted({m.record_id for m in request_matches(session, request_id, dataset_id)
                   if m.erased_in_shard_version is not None})


@dataclass(frozen=True)
class Verification:
    passed: bool
    ensemble_version: str | None
    erased_records: int
    still_in_manifest: int

    def to_dict(self) -> dict:
        return {"passed": self.passed, "ensemble_version": self.ensemble_version,
                "erased_records": self.erased_records, "still_in_manifest": self.still_in_manifest}


def verify_request(settings: Settings, session: Session, request_id: str, dataset_name: str) -> Verification:
    """The ensemble in service was trained on none of the request's erased records
    (its training manifest: every member checkpoint's ``seen_ids``)."""
    from pipeline.training import current_ensemble, checkpoint_store
    from shards.ensemble import training_ids

    dataset = dataset_or_fail(session, dataset_name)
    erased = erased_record_ids(session, request_id, dataset.id)
    version = current_ensemble(session, dataset.id, settings)
    if version is None:
        return Verification(True, None, len(erased), 0)
    seen = training_ids(version, checkpoint_store(settings, dataset_name))
    left = sum(rid in seen for rid in erased)
    return Verification(left == 0, version.version_id, len(erased), left)


def open_requests_waiting(session: Session, dataset_id: int) -> list[ErasureRequest]:
    """Requests waiting for retraining of this dataset's shards, earliest deadline first."""
    ids = select(RequestMatch.request_id).where(RequestMatch.dataset_id == dataset_id).distinct()
    return list(session.scalars(
        select(ErasureRequest).where(
            ErasureRequest.id.in_(ids), ErasureRequest.state.in_(["awaiting_retrain", "retraining"])
        ).order_by(ErasureRequest.due_at, ErasureRequest.id)
    ))


def per_method_counts(matches: list[RequestMatch]) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = defaultdict(lambda: {"found": 0, "erased": 0, "kept": 0})
    for m in matches:
        row = table[m.method]
        row["found"] += 1
        row["erased"] += m.erased_in_shard_version is not None
        row["kept"] += m.final_decision == KEEP
    return dict(sorted(table.items()))



# ---------------------------------------------------------------- superseded files


@dataclass(frozen=True)
class PurgeReport:
    shard_versions: list[dict]  # {"shard", "version"} whose file and locate index were deleted
    checkpoints: list[str]  # keys of deleted sub-model checkpoints
    kept_in_service: list[str]  # checkpoints that saw erased records but serve the current ensemble (none expected)
    deferred_shards: list[int]  # shards another open request still needs the old files of

    def to_dict(self) -> dict:
        return {"shard_versions": self.shard_versions, "checkpoints": self.checkpoints,
                "kept_in_service": self.kept_in_service, "deferred_shards": self.deferred_shards}


# Requests whose erasure is under way: their membership probe still reads the superseded
# files. Any other state (failed, completed, denied, or not yet erasing) does not hold the
# files back: a failed request that is reopened probes what is left (a purged file reads as
# "not found"), so a failed sibling cannot keep erased records on disk forever.
PROBE_PENDING_STATES = ("erasing", "awaiting_retrain", "retraining", "verifying")


def shard_purge_blocked_by(session: Session, dataset_id: int, shard: int, request_id: str | None) -> str | None:
    """The id of another request whose erasure from the shard is under way (it needs the old files), or None."""
    query = select(RequestMatch.request_id).join(ErasureRequest, ErasureRequest.id == RequestMatch.request_id).where(
        RequestMatch.dataset_id == dataset_id, RequestMatch.shard == shard,
        RequestMatch.erased_in_shard_version.is_not(None), ErasureRequest.state.in_(PROBE_PENDING_STATES))
    if request_id is not None:
        query = query.where(RequestMatch.request_id != str(request_id))
    return session.scalar(query.limit(1))


def purge_shard_files(settings: Settings, session: Session, dataset_id: int, shard: int,
                      now: datetime) -> tuple[list[dict], list[str], list[str]]:
    """Delete every file of one shard that still holds an erased record: superseded shard
    versions (Parquet file and locate index) and the sub-model checkpoints trained on such
    a version from the record's slice on; their rows are marked purged. Returns
    (versions purged, checkpoint keys purged, checkpoints kept because they serve).
    A deletion error raises (the caller's transaction rolls back; a rerun retries).
    With a storage URL the objects are deleted from the store (and checked gone) with
    this host's cached copies; an object another live row still names is kept."""
    from pipeline.locate import remove_index
    from pipeline.training import checkpoint_store, current_ensemble_row

    held = list(session.scalars(select(Record).where(
        Record.dataset_id == dataset_id, Record.shard == shard, Record.erased_in_shard_version.is_not(None))))

    def held_by(version: int, from_slice: int | None = None) -> bool:
        return any(r.first_shard_version <= version < r.erased_in_shard_version
                   and (from_slice is None or r.slice <= from_slice) for r in held)

    purged_versions: list[dict] = []
    purged_checkpoints: list[str] = []
    in_service: list[str] = []
    recorded: list[str] = []  # what the purged rows name: with a store, their objects are deleted below
    for version in session.scalars(select(ShardVersion).where(
            ShardVersion.dataset_id == dataset_id, ShardVersion.shard == shard,
            ShardVersion.files_purged_at.is_(None)).order_by(ShardVersion.version)):
        if held_by(version.version):
            local = home_path_of(settings, version.path,
                                 shard_version_home_path(settings, _name(session, dataset_id), shard, version.version))
            remove_index(local)
            local.unlink(missing_ok=True)
            version.files_purged_at = now
            recorded += [version.path] + ([version.index_url] if version.index_url is not None else [])
            purged_versions.append({"shard": shard, "version": version.version})
    current = current_ensemble_row(session, dataset_id)
    serving = set() if current is None else set(session.scalars(
        select(EnsembleMemberRow.checkpoint_key).where(EnsembleMemberRow.ensemble_id == current.id)))
    for checkpoint in session.scalars(select(Checkpoint).where(
            Checkpoint.dataset_id == dataset_id, Checkpoint.shard == shard,
            Checkpoint.file_purged_at.is_(None)).order_by(Checkpoint.key)):
        if not held_by(checkpoint.shard_version, checkpoint.slice):
            continue
        if checkpoint.key in serving:  # verification would have failed; never delete what serves
            in_service.append(checkpoint.key)
            continue
        home_path_of(settings, checkpoint.path, checkpoint_store(settings, _name(session, dataset_id))
                     .path_for(checkpoint.key)).unlink(missing_ok=True)
        checkpoint.file_purged_at = now
        recorded.append(checkpoint.path)
        purged_checkpoints.append(checkpoint.key)
    purged_checkpoints += _purge_baselines(session, dataset_id, shard, held_by, now, settings, recorded)
    session.flush()
    _delete_unnamed_objects(settings, session, recorded)
    return purged_versions, purged_checkpoints, in_service


def _name(session: Session, dataset_id: int) -> str:
    return session.get(Dataset, dataset_id).name


def _delete_unnamed_objects(settings: Settings, session: Session, recorded: list[str]) -> None:
    """Delete the objects purged rows name (each checked gone), except those a live row still names
    (the same bytes); the live names are read once, after the purged rows are flushed."""
    urls = list(dict.fromkeys(r for r in recorded if is_object_url(r)))
    if not urls:
        return
    from pipeline.gc import live_object_urls

    live = live_object_urls(session)
    for url in urls:
        if url not in live:
            delete_object(settings, url)


def _purge_baselines(session: Session, dataset_id: int, shard: int, held_by, now: datetime,  # noqa: ANN001
                     settings: Settings | None = None, recorded: list[str] | None = None) -> list[str]:
    """Delete the monolithic baselines (``erasure train --baseline``) trained on a version of ``shard``
    that held an erased record; their rows are marked purged. Returns their checkpoint keys; what
    their rows name is added to ``recorded`` (objects the caller deletes)."""
    from db.training import BaselineModel

    purged = []
    for baseline in session.scalars(select(BaselineModel).where(
            BaselineModel.dataset_id == dataset_id, BaselineModel.file_purged_at.is_(None))
            .order_by(BaselineModel.id)):
        version = json.loads(baseline.shard_versions).get(str(shard))
        if version is None or not held_by(int(version)):
            continue
        if settings is not None and is_object_url(baseline.path):  # a storage URL: the object and this host's copy
            from pipeline.training import checkpoint_store

            checkpoint_store(settings, _name(session, dataset_id)).path_for(baseline.checkpoint_key).unlink(
                missing_ok=True)
        else:
            Path(baseline.path).unlink(missing_ok=True)
        baseline.file_purged_at = now
        if recorded is not None:
            recorded.append(baseline.path)
        purged.append(baseline.checkpoint_key)
    return purged


def purge_superseded_files(settings: Settings, session: Session, request_id: str) -> PurgeReport:
    """Delete the files that still hold erased records, once the request is
    retrained and verified: in each shard it erased from, every superseded shard
    version that contained an erased record (Parquet file and locate index) and
    every sub-model checkpoint trained on such a version from the record's slice
    on. The rows stay, as lineage, marked ``files_purged_at`` / ``file_purged_at``.

    A version v of shard s held record r iff r.first_shard_version <= v <
    r.erased_in_shard_version; a checkpoint after slice c of version v saw r iff
    also c >= r.slice. Nothing deleted is needed again: the ensemble in service and
    later retraining start from versions without the records. A shard where
    another request's erasure is under way (``PROBE_PENDING_STATES``) keeps its old
    files (that request's membership probe reads them); that request's completion,
    or the next ``erasure gc``, purges them for every erased record of the shard. Idempotent."""
    touched = sorted({(m.dataset_id, m.shard) for m in request_matches(session, request_id)
                      if m.erased_in_shard_version is not None})
    now = utcnow()
    purged_versions: list[dict] = []
    purged_checkpoints: list[str] = []
    in_service: list[str] = []
    deferred: list[int] = []
    for dataset_id, shard in touched:
        if shard_purge_blocked_by(session, dataset_id, shard, request_id) is not None:
            deferred.append(shard)
            continue
        versions, checkpoints, serving = purge_shard_files(settings, session, dataset_id, shard, now)
        purged_versions += versions
        purged_checkpoints += checkpoints
        in_service += serving
    report = PurgeReport(purged_versions, purged_checkpoints, in_service, deferred)
    if purged_versions or purged_checkpoints or deferred:
        append_event(session, "files.purged", report.to_dict(), actor="flow:verify", request_id=str(request_id))
    return report
