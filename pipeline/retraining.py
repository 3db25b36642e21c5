"""Retraining: one shard's sub-model at a time, from the checkpoint before the
earliest slice its removed records were in.

A shard's pending removals are one job (``shard_retrain_jobs``). Retraining
claims it (``running``, pinned to the shard version recorded then; erasures
arriving later start the next pending job), trains, and in one transaction
records the checkpoints, publishes the new ensemble version and marks the job
``done``. Killed while training, the job stays ``running`` and the next run
resumes it: checkpoints already written are content-addressed and restored,
so only the remaining slices train again.
"""

from __future__ import annotations

from sqlalchemy import select

from db.audit import append_event
from db.lineage import latest_shard_versions
from db.locks import lock_dataset, lock_shard, retrain_lock
from db.models import Dataset, ShardVersion, utcnow
from db.session import unit_of_work
from db.settings import Settings
from db.training import JOB_DONE, JOB_PENDING, JOB_RUNNING, Checkpoint, RequestMatch, ShardRetrainJob
from pipeline.database import open_database
from pipeline.erasure import crash_point, dataset_or_fail
from pipeline.lifecycle import RequestState, get_request, transition
from pipeline.training import checkpoint_store, current_ensemble, publish_ensemble, record_checkpoints
from shards.checkpoints import CheckpointStore
from shards.device import Runtime
from shards.retrain import retrain_from_slice
from shards.training import TrainConfig, checkpoint_chain, shard_from_parquet, train_shard

ACTOR = "flow:retrain"


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
        if job.status == JOB_PENDING:
            job.status = JOB_RUNNING
            job.started_at = utcnow()
            job.target_shard_version = latest_shard_versions(session, ds.id)[shard].version
        served = session.scalars(
            select(RequestMatch.request_id).where(RequestMatch.retrain_job_id == job.id).distinct()
        ).all()
        for request_id in sorted(served):
            if get_request(session, request_id).state == RequestState.AWAITING_RETRAIN:
                transition(session, request_id, RequestState.RETRAINING, actor=ACTOR,
                           reason=f"retraining shard {shard} of {dataset} (job {job.id})")
        return {"job_id": job.id, "dataset_id": ds.id, "target_version": job.target_shard_version}


def _train(settings: Settings, engine, dataset: str, shard: int, claim: dict) -> dict:  # noqa: ANN001
    """Retrain the shard's member of the ensemble in service on the claimed version."""
    store = checkpoint_store(settings, dataset)
    with unit_of_work(engine) as session:
        ensemble = current_ensemble(session, claim["dataset_id"])
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
    base_data = shard_from_parquet(base.path, str(shard), unlabeled="skip")
    target_data = shard_from_parquet(target.path, str(shard), unlabeled="skip")
    removed = sorted(base_data.all_ids() - target_data.all_ids())
    added = target_data.all_ids() - base_data.all_ids()
    if added:  # the shard also grew since it was trained: train the new data, resuming where it agrees
        runtime = Runtime.from_dict(payload["runtime"])
        result = train_shard(target_data, config, store, threads=runtime.threads)
        keys = checkpoint_chain(target_data, config)
        return {"outcome": "retrain", "final": result.final, "keys": keys, "restored_slice":
                result.restored_from.slice_index if result.restored_from else -1,
                "samples": result.cost.samples_processed, "full": result.cost.full_training_samples,
                "seconds": result.cost.wall_seconds, "device": result.cost.device, "removed": len(removed)}
    result = retrain_from_slice(base_data, removed, config, store,
                                on_checkpoint=lambda ref: crash_point("retrain:after_checkpoint"))
    plan = result.plan
    return {"outcome": plan.outcome, "final": result.final, "keys": list(plan.chain_keys),
            "restored_slice": plan.restore_slice if plan.outcome != "emptied" else None,
            "samples": result.cost.samples_processed, "full": plan.full_training_samples,
            "seconds": result.cost.wall_seconds, "device": result.cost.device, "removed": len(removed),
            "earliest_affected_slice": plan.earliest_affected_slice}


def _record(settings: Settings, engine, dataset: str, shard: int, claim: dict, trained: dict) -> dict:  # noqa: ANN001
    store: CheckpointStore = checkpoint_store(settings, dataset)
    with unit_of_work(engine) as session:
        lock_dataset(session, claim["dataset_id"])
        job = session.get(ShardRetrainJob, claim["job_id"], populate_existing=True)
        if job.status == JOB_DONE:
            return {"job_id": job.id, "status": "already_done", "ensemble_version": job.ensemble_version_id}
        version_id = None
        if trained["outcome"] != "untrained":
            record_checkpoints(session, store, claim["dataset_id"], shard, claim["target_version"], trained["keys"])
            ensemble = current_ensemble(session, claim["dataset_id"])
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
        append_event(session, "shard.retrained", {
            "dataset": dataset, "shard": shard, "job_id": job.id, "outcome": trained["outcome"],
            "shard_version": claim["target_version"], "restored_slice": job.restored_slice,
            "samples_processed": job.samples_processed, "full_training_samples": job.full_training_samples,
            "device": job.device, "ensemble_version": version_id,
        }, actor=ACTOR)
        return {"job_id": job.id, "status": "done", "outcome": trained["outcome"], "ensemble_version": version_id,
                "restored_slice": job.restored_slice, "samples_processed": job.samples_processed,
                "full_training_samples": job.full_training_samples, "removed": trained.get("removed", 0)}


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
                trained = _train(settings, engine, dataset, shard, claim)
                crash_point("retrain:trained")
                done.append({"shard": shard, **_record(settings, engine, dataset, shard, claim, trained)})
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
