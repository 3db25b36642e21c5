"""Retraining as Prefect flows: ``retrain_shard`` (one shard's pending removals)
and the scheduled ``retrain_pending``.

``retrain_shard`` is its own flow so that a deployment can send it to the
``gpu`` work pool (set ``ERASURE_RETRAIN_DEPLOYMENT=retrain-shard/gpu``);
without that each shard runs in the calling process as a task of the calling
flow (a task costs a fraction of a subflow's ~1 s of orchestration).
"""

from __future__ import annotations

import flows.prefect_setup  # noqa: F401  (our Prefect defaults, before prefect is imported)

import os

from prefect import flow, get_run_logger, task

from db.settings import load_settings
from flows.retries import RETRY
from pipeline.retraining import pending_shards, retrain_shard_jobs

DEPLOYMENT_ENV = "ERASURE_RETRAIN_DEPLOYMENT"
LOST_RUN_RESTARTS = 3  # a shard retraining whose host dies is started again this many times


@task(name="retrain-shard-jobs", result_serializer="json", **RETRY)
def retrain_shard_task(dataset: str, shard: int) -> list[dict]:
    return retrain_shard_jobs(load_settings(), dataset, shard)


@flow(name="retrain-shard")
def retrain_shard(dataset: str, shard: int) -> list[dict]:
    """Retrain one shard's sub-model without its pending removals (its own flow: a GPU pool can run it)."""
    return retrain_shard_task(dataset, shard)


def dispatch_retraining(dataset: str, shards: list[int]) -> list[dict]:
    """Retrain each shard: on the deployment named by ``$ERASURE_RETRAIN_DEPLOYMENT``
    (e.g. the ``gpu`` pool) when set, else in this process. A run there that crashed
    (its host was lost) is started again, up to ``LOST_RUN_RESTARTS`` times."""
    deployment = os.environ.get(DEPLOYMENT_ENV)
    results: list[dict] = []
    for shard in shards:
        if deployment:
            from prefect.deployments import run_deployment

            run = run_deployment(deployment, parameters={"dataset": dataset, "shard": shard}, timeout=None)
            restarts = 0
            while run.state.is_crashed() and restarts < LOST_RUN_RESTARTS:
                # its host or worker died (flows/lost_runs.py marks such a run Crashed): start it again
                # on the pool; the new run resumes the killed one's claim and stored checkpoints
                restarts += 1
                get_run_logger().warning("retraining shard %s of %s on %s crashed (%s); starting it again (%d/%d)",
                                         shard, dataset, deployment, run.state.message, restarts, LOST_RUN_RESTARTS)
                run = run_deployment(deployment, parameters={"dataset": dataset, "shard": shard}, timeout=None)
            if not run.state.is_completed():
                raise RuntimeError(f"retraining shard {shard} of {dataset} on {deployment} ended {run.state.name}")
            results.append({"shard": shard, "flow_run": str(run.id)})
        else:
            results.extend(retrain_shard_task(dataset, shard))
    return results


@flow(name="retrain-pending")
def retrain_pending(dataset: str | None = None) -> dict:
    """Scheduled: retrain every shard with pending removals once, earliest due date
    first, then verify and complete the requests that waited for them."""
    from flows.process_request import finish_waiting_requests

    settings = load_settings()
    retrained = []
    for name, shard in pending_shards(settings, dataset):
        retrained += dispatch_retraining(name, [shard])
    completed = finish_waiting_requests(dataset)
    return {"retrained": retrained, "completed": completed}
