"""``sweep_requests``: the scheduled safety net (every few minutes, ``infra/prefect.yaml``).

It starts the processing deployment for every request that needs a run and has none
live (``pipeline/sweep.py`` says which: received ones the API could not start, and
ones stuck in an open state past a bound), and publishes the requests due within
7 days as a table artifact ``requests-due-soon`` (ids, states and due dates only).
A sweep's starts use the key ``<request id>:sweep:<sweep run id>``: the API's key
(the request id alone) would return the earlier, ended run.
"""

# No `from __future__ import annotations` (see flows/process_request.py).
import flows.prefect_setup  # noqa: F401  (our Prefect defaults, before prefect is imported)

from datetime import timedelta

from prefect import flow, get_client, get_run_logger, runtime, task
from prefect.artifacts import create_table_artifact
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType

from db.session import unit_of_work
from db.settings import load_settings
from flows.dispatch import start_processing_run
from flows.retries import RETRY
from pipeline.database import open_database
from pipeline.sweep import DUE_SOON, due_soon_table, requests_due_soon, requests_to_start

PROCESS_FLOW = "process-erasure-request"
LIVE_STATES = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]


@task(name="requests-to-start", result_serializer="json", **RETRY)
def waiting_requests(stuck_after_s: int, received_grace_s: int) -> list[dict]:
    engine = open_database(load_settings())
    try:
        with unit_of_work(engine) as session:
            return [r.to_dict() for r in requests_to_start(session, stuck_after=timedelta(seconds=stuck_after_s),
                                                           received_grace=timedelta(seconds=received_grace_s))]
    finally:
        engine.dispose()


@task(name="requests-with-a-live-run", result_serializer="json", **RETRY)
def requests_with_live_runs() -> list[str]:
    """Request ids of processing runs scheduled, pending, running, paused or cancelling
    (from any deployment, or an operator's direct call)."""
    ids: set[str] = set()
    with get_client(sync_client=True) as client:
        offset = 0
        while True:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[PROCESS_FLOW])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=LIVE_STATES))),
                limit=200, offset=offset)
            ids |= {str(run.parameters["request_id"]) for run in runs if run.parameters.get("request_id")}
            if len(runs) < 200:
                return sorted(ids)
            offset += len(runs)


@task(name="due-soon", result_serializer="json", **RETRY)
def due_soon(within_days: int) -> list[dict]:
    engine = open_database(load_settings())
    try:
        with unit_of_work(engine) as session:
            return due_soon_table(requests_due_soon(session, timedelta(days=within_days)))
    finally:
        engine.dispose()


@flow(name="sweep-requests")
def sweep_requests(stuck_after_s: int | None = None, received_grace_s: int | None = None,
                   due_within_days: int = DUE_SOON.days) -> dict:
    """Start processing for every request left waiting; report those due soon (ids and counts only)."""
    settings = load_settings()
    logger = get_run_logger()
    stuck_after_s = settings.sweep_stuck_after_s if stuck_after_s is None else stuck_after_s
    received_grace_s = settings.sweep_received_grace_s if received_grace_s is None else received_grace_s
    waiting = waiting_requests(stuck_after_s, received_grace_s)
    live = set(requests_with_live_runs()) if waiting else set()
    started, failed = [], []
    deployment = settings.process_deployment
    sweep_run = runtime.flow_run.id or "local"
    for request in waiting:
        if request["request_id"] in live or not deployment:
            continue
        try:
            start_processing_run(deployment, request["request_id"], f"{request['request_id']}:sweep:{sweep_run}")
            started.append(request["request_id"])
        except Exception as exc:  # noqa: BLE001 - one request's failed start must not stop the others; reported below
            logger.warning("could not start %s for request %s: %s", deployment, request["request_id"],
                           type(exc).__name__)
            failed.append(request["request_id"])
    rows = due_soon(due_within_days)
    create_table_artifact(key="requests-due-soon", table=rows,
                          description=f"open requests overdue or due within {due_within_days} days "
                                      "(ids, states and due dates only)")
    summary = {"waiting": len(waiting), "live": len([r for r in waiting if r["request_id"] in live]),
               "started": started, "failed_to_start": failed, "deployment": deployment or None,
               "due_soon": len(rows)}
    if failed:
        # Every start failed or some did: the run fails so that the sweep's state shows it.
        raise RuntimeError(f"{len(failed)} of {len(failed) + len(started)} processing run(s) could not be started "
                           f"on {deployment!r}; the next sweep tries again")
    return summary

