"""Retraining: one shard's sub-model at a time, from the checkpoint before the
earliest slice its removed records were in.

A shard's pending removals are one job (``shard_retrain_jobs``). Retraining
claims it (``running``, pinned to the shard version recorded then; erasures
arriving later start the next pending job), trains, and in one transaction
records the checkpoints, publishes the new ensemble version and marks the job
``done``. Killed while training, the job stays ``running`` and the next run
resumes it: checkpoints already written are content-addressed and restored,
so only the remaining slices train again.

Runtime. A sub-model is retrained in the runtime recorded in its checkpoints
(device kind, torch version, CPU threads, deterministic mode; this worker's
``ERASURE_DEVICE`` / ``ERASURE_TORCH_THREADS``, when set, are what it offers).
Where they differ the retraining is refused (``RuntimeMismatchError``): the
claim is released, the job stays pending and its requests wait, unless
``ERASURE_ALLOW_CROSS_RUNTIME_RETRAIN`` allows it. Either way the job records
the runtime it ran in, the recorded one, and whether they (and the model
config) matched: the certificate states exactness from these facts only.

Publishing under the shard lock. An erasure (or an ingest) may commit a newer
version of the shard while it retrains. The new member is published only if
the version it trained on is still the shard's latest, checked under the
shard's lock in the publishing transaction; otherwise its checkpoints are
recorded (lineage: they held records erased since, and the purge deletes them),
the job is re-targeted to the latest version and trained again.
"""

from __future__ import annotations

import os

from sqlalchemy import select

from db.audit import append_event, canonical_json
from db.lineage import latest_shard_versions
from db.locks import lock_dataset, lock_shard, retrain_lock
from db.models import Dataset, ShardVersion, utcnow
from db.session import unit_of_work
from db.settings import Settings
from db.training import JOB_DONE, JOB_PENDING, JOB_RUNNING, Checkpoint, RequestMatch, ShardRetrainJob
from pipeline.database import open_database
from pipeline.erasure import crash_point, dataset_or_fail
from pipeline.lifecycle import RequestState, TransitionCode, get_request, transition
from pipeline.object_store import shard_file
from pipeline.training import checkpoint_store, current_ensemble, publish_ensemble, record_checkpoints
from shards.checkpoints import CheckpointStore
from shards.device import DEVICE_ENV, THREADS_ENV, Runtime
from shards.retrain import RuntimeMismatchError, chain_facts, retrain_from_slice, retrain_runtime
from shards.training import TrainConfig, checkpoint_chain, shard_for_config, train_shard

ACTOR = "flow:retrain"


class CrossRuntimeRetrainRefused(RuntimeMismatchError):
    """The retraining was refused (and its claim released) because this worker's runtime is not the recorded one."""


def worker_runtime_request() -> tuple[str | None, int | None]:
    """The device and CPU thread count this worker is configured for (``ERASURE_DEVICE``,
    ``ERASURE_TORCH_THREADS``); None where unset (then the recorded ones are used)."""
    threads = os.environ.get(THREADS_ENV)
    return os.environ.get(DEVICE_ENV) or None, int(threads) if threads else None


def _claim(settings: Settings, engine, dataset: str, shard: int) -> dict | None:  # noqa: ANN001
    """The shard's running job (resumed) or its oldest pending one, now running on the
    shard's latest version; the requests it serves move to ``retraining``."""
    with unit_of_work(engine) as session:
        ds = dataset_or_fail(session, dataset)
        lock_shard(session, ds.id, shard)
        jobs = list(session.scalars(
            select(ShardRetrainJob).where(
                ShardRetrainJob.dataset_id == ds.id, ShardRetrainJob.shard == shard,
                ShardRetrainJob.status.in_([JOB_RUNNING, JOB_PENDING]),
            ).order_by(ShardRetrainJob.status.desc(), ShardRetrainJob.id)  # running before pending
        ))
        if not jobs:
            return None
        job = jobs[0]
        was_pending = job.status == JOB_PENDING
        if was_pending:
            job.status = JOB_RUNNING
            job.started_at = utcnow()
            job.target_shard_version = latest_shard_versions(session, ds.id)[shard].version
        served = session.scalars(
            select(RequestMatch.request_id).where(RequestMatch.retrain_job_id == job.id).distinct()
        ).all()
        moved = []
        for request_id in sorted(served):
            if get_request(session, request_id).state == RequestState.AWAITING_RETRAIN:
                transition(session, request_id, RequestState.RETRAINING, actor=ACTOR,
                           code=TransitionCode.RETRAINING_STARTED, counts={"shard": shard, "job_id": job.id})
                moved.append(request_id)
        return {"job_id": job.id, "dataset_id": ds.id, "target_version": job.target_shard_version,
                "was_pending": was_pending, "moved": moved}


def _release(engine, dataset: str, shard: int, claim: dict, refused: RuntimeMismatchError) -> None:  # noqa: ANN001
    """Undo a claim whose retraining was refused: the job is pending again (or stays running when
    it was resumed), its requests wait again; the refusal is in the audit log."""
    with unit_of_work(engine) as session:
        lock_shard(session, claim["dataset_id"], shard)
        job = session.get(ShardRetrainJob, claim["job_id"], populate_existing=True)
        if claim["was_pending"] and job.status == JOB_RUNNING:
            job.status, job.started_at, job.target_shard_version = JOB_PENDING, None, None
        for request_id in claim["moved"]:
            if get_request(session, request_id).state == RequestState.RETRAINING:
                # the differences are on the shard.retrain_refused event below
                transition(session, request_id, RequestState.AWAITING_RETRAIN, actor=ACTOR,
                           code=TransitionCode.RETRAINING_REFUSED, counts={"shard": shard, "job_id": job.id})
        append_event(session, "shard.retrain_refused", {
            "dataset": dataset, "shard": shard, "job_id": job.id, "job_status": job.status,
            "differences": list(refused.differences), "recorded_device": refused.recorded.device_kind,
            "worker_device": refused.actual.device_kind,
        }, actor=ACTOR)


def _train(settings: Settings, engine, dataset: str, shard: int, claim: dict) -> dict:  # noqa: ANN001
    """Retrain the shard's member of the ensemble in service on the claimed version."""
    store = checkpoint_store(settings, dataset)
    with unit_of_work(engine) as session:
        ensemble = current_ensemble(session, claim["dataset_id"], settings)
        member = next((m for m in ensemble.members if m.shard_id == str(shard)), None) if ensemble else None
        if member is None:
            return {"outcome": "untrained", "final": None}
        base_row = session.get(Checkpoint, (claim["dataset_id"], member.checkpoint.key))
        target = session.scalars(select(ShardVersion).where(
            ShardVersion.dataset_id == claim["dataset_id"], ShardVersion.shard == shard,
            ShardVersion.version == claim["target_version"])).one()
        base = session.scalars(select(ShardVersion).where(
            ShardVersion.dataset_id == claim["dataset_id"], ShardVersion.shard == shard,
            ShardVersion.version == base_row.shard_version)).one()
    payload = store.load(member.checkpoint.key)
    config = TrainConfig.from_dict(payload["config"])
    base_data = shard_for_config(shard_file(settings, base, dataset), str(shard), config)
    target_data = shard_for_config(shard_file(settings, target, dataset), str(shard), config)
    removed = sorted(base_data.all_ids() - target_data.all_ids())
    added = target_data.all_ids() - base_data.all_ids()
    device, threads = worker_runtime_request()
    allowed = settings.allow_cross_runtime_retrain
    if added:  # the shard also grew since it was trained: train the new data, resuming where it agrees
        recorded = Runtime.from_dict(payload["runtime"])
        runtime = retrain_runtime(recorded, device, threads)
        if not runtime.matches(recorded) and not allowed:
            raise CrossRuntimeRetrainRefused(str(shard), recorded, runtime)
        result = train_shard(target_data, config, store, device=runtime.device, threads=runtime.threads)
        keys = checkpoint_chain(target_data, config)
        runtime_ok, config_ok = chain_facts(store, keys, recorded, config)
        return {"outcome": "retrain", "final": result.final, "keys": keys, "restored_slice":
                result.restored_from.slice_index if result.restored_from else -1,
                "samples": result.cost.samples_processed, "full": result.cost.full_training_samples,
                "seconds": result.cost.wall_seconds, "device": result.cost.device, "removed": len(removed),
                "runtime": runtime, "recorded_runtime": recorded, "runtime_matches": runtime_ok,
                "config_matches": config_ok}
    try:
        result = retrain_from_slice(base_data, removed, config, store, device=device, threads=threads,
                                    allow_cross_runtime=allowed,
                                    on_checkpoint=lambda ref: crash_point("retrain:after_checkpoint"))
    except RuntimeMismatchError as exc:
        raise CrossRuntimeRetrainRefused(exc.shard_id, exc.recorded, exc.actual) from None
    plan = result.plan
    return {"outcome": plan.outcome, "final": result.final, "keys": list(plan.chain_keys),
            "restored_slice": plan.restore_slice if plan.outcome != "emptied" else None,
            "samples": result.cost.samples_processed, "full": plan.full_training_samples,
            "seconds": result.cost.wall_seconds, "device": result.cost.device, "removed": len(removed),
            "earliest_affected_slice": plan.earliest_affected_slice, "runtime": result.runtime,
            "recorded_runtime": result.recorded_runtime, "runtime_matches": result.environment_matches,
            "config_matches": result.config_matches}


def _runtime_json(runtime: Runtime | None) -> str | None:
    return canonical_json(runtime.to_dict()) if runtime is not None else None


def _record(settings: Settings, engine, dataset: str, shard: int, claim: dict, trained: dict) -> dict:  # noqa: ANN001
    """Publish the retrained member and mark the job done, under the shard's lock; ``stale``
    (nothing published) when the shard has a newer version than the one trained on."""
    store: CheckpointStore = checkpoint_store(settings, dataset)
    with unit_of_work(engine) as session:
        lock_shard(session, claim["dataset_id"], shard)  # shard locks before the dataset lock, as erasure does
        lock_dataset(session, claim["dataset_id"])
        job = session.get(ShardRetrainJob, claim["job_id"], populate_existing=True)
        if job.status == JOB_DONE:
            return {"job_id": job.id, "status": "already_done", "ensemble_version": job.ensemble_version_id}
        latest = latest_shard_versions(session, claim["dataset_id"])[shard].version
        if trained["outcome"] != "untrained" and latest != claim["target_version"]:
            # Trained on a version that an erasure (or ingest) has since superseded: it may have seen
            # records erased meanwhile, so it is not published. Its checkpoints are recorded as lineage.
            if trained["keys"]:
                record_checkpoints(session, store, claim["dataset_id"], shard, claim["target_version"], trained["keys"])
            job.target_shard_version = latest
            append_event(session, "shard.retrain_superseded", {
                "dataset": dataset, "shard": shard, "job_id": job.id,
                "trained_shard_version": claim["target_version"], "latest_shard_version": latest,
            }, actor=ACTOR)
            return {"job_id": job.id, "status": "stale", "target_version": latest}
        version_id = None
        if trained["outcome"] != "untrained":
            record_checkpoints(session, store, claim["dataset_id"], shard, claim["target_version"], trained["keys"])
            ensemble = current_ensemble(session, claim["dataset_id"], settings)
            updated = ensemble.with_member(str(shard), trained["final"])
            published, _ = publish_ensemble(settings, session, claim["dataset_id"], dataset, updated,
                                            created_by=f"retrain:job:{job.id}")
            version_id = published.version_id
        job.status = JOB_DONE
        job.finished_at = utcnow()
        job.ensemble_version_id = version_id
        job.restored_slice = trained.get("restored_slice")
        job.samples_processed = trained.get("samples")
        job.full_training_samples = trained.get("full")
        job.wall_seconds = trained.get("seconds")
        job.device = trained.get("device")
        job.outcome = trained["outcome"]
        job.runtime = _runtime_json(trained.get("runtime"))
        job.recorded_runtime = _runtime_json(trained.get("recorded_runtime"))
        job.runtime_matches = trained.get("runtime_matches")
        job.config_matches = trained.get("config_matches")
        append_event(session, "shard.retrained", {
            "dataset": dataset, "shard": shard, "job_id": job.id, "outcome": trained["outcome"],
            "shard_version": claim["target_version"], "restored_slice": job.restored_slice,
            "samples_processed": job.samples_processed, "full_training_samples": job.full_training_samples,
            "device": job.device, "ensemble_version": version_id,
            "runtime_matches": job.runtime_matches, "config_matches": job.config_matches,
        }, actor=ACTOR)
        return {"job_id": job.id, "status": "done", "outcome": trained["outcome"], "ensemble_version": version_id,
                "restored_slice": job.restored_slice, "samples_processed": job.samples_processed,
                "full_training_samples": job.full_training_samples, "removed": trained.get("removed", 0),
                "runtime_matches": job.runtime_matches}


def run_claimed_job(settings: Settings, engine, dataset: str, shard: int, claim: dict,  # noqa: ANN001
                    trained: dict | None = None) -> dict:
    """Train the claimed job (unless ``trained`` is given) and publish it; trained again on the
    latest version as long as publishing finds the shard superseded. A refused retraining
    releases the claim and raises ``CrossRuntimeRetrainRefused``."""
    while True:
        if trained is None:
            try:
                trained = _train(settings, engine, dataset, shard, claim)
            except RuntimeMismatchError as exc:
                _release(engine, dataset, shard, claim, exc)
                raise
            crash_point("retrain:trained")
        recorded = _record(settings, engine, dataset, shard, claim, trained)
        if recorded["status"] != "stale":
            return recorded
        claim, trained = {**claim, "target_version": recorded["target_version"]}, None


def retrain_shard_jobs(settings: Settings, dataset: str, shard: int) -> list[dict]:
    """Run the shard's running and pending jobs, one after another; returns each job's summary."""
    engine = open_database(settings)
    done: list[dict] = []
    try:
        with unit_of_work(engine) as session:
            dataset_id = dataset_or_fail(session, dataset).id
        with retrain_lock(engine, dataset_id, shard):
            while (claim := _claim(settings, engine, dataset, shard)) is not None:
                crash_point("retrain:claimed")
                done.append({"shard": shard, **run_claimed_job(settings, engine, dataset, shard, claim)})
    finally:
        engine.dispose()
    return done


def pending_shards(settings: Settings, dataset: str | None = None) -> list[tuple[str, int]]:
    """(dataset, shard) with running or pending jobs, earliest due date first, each once."""
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            query = (select(Dataset.name, ShardRetrainJob.shard, ShardRetrainJob.due_at)
                     .join(Dataset, Dataset.id == ShardRetrainJob.dataset_id)
                     .where(ShardRetrainJob.status.in_([JOB_PENDING, JOB_RUNNING]))
                     .order_by(ShardRetrainJob.due_at, ShardRetrainJob.id))
            if dataset is not None:
                query = query.where(Dataset.name == dataset)
            ordered: list[tuple[str, int]] = []
            for name, shard, _ in session.execute(query):
                if (name, shard) not in ordered:
                    ordered.append((name, shard))
            return ordered
    finally:
        engine.dispose()
