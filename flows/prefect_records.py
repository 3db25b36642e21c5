"""What Prefect keeps about an erasure request's runs, read through its API, for the residue
check (``pipeline.residue``): flow runs (parameters, state messages), their task runs
(inputs, state messages), logs and artifacts, as strings by place. The service layer
never imports Prefect: entry points hand this reader to it."""

from __future__ import annotations

import json

MAX_FLOW_RUNS = 1000  # runs read from the server to find the request's (newest first)
PAGE = 200  # the server's largest page


def _pages(read, limit: int | None = None, **filters) -> list:  # noqa: ANN001, ANN003
    """Every item a paged ``read_*`` call returns (up to ``limit``)."""
    items: list = []
    while limit is None or len(items) < limit:
        page = read(limit=PAGE, offset=len(items), **filters)
        items += page
        if len(page) < PAGE:
            break
    return items


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(k) + _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def request_run_records(request_id: str) -> list[dict]:
    """One entry per record Prefect holds about the request's flow runs:
    ``{"place": flow_run | task_run | log | artifact, "id": ..., "strings": [...]}``.
    An empty list when no run of the request is on the server; Prefect's errors propagate."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    places: list[dict] = []
    with get_client(sync_client=True) as client:
        runs = [r for r in _pages(client.read_flow_runs, MAX_FLOW_RUNS, sort=FlowRunSort.START_TIME_DESC)
                if str(r.parameters.get("request_id")) == str(request_id)]
        if not runs:
            return []
        run_ids = [r.id for r in runs]
        for run in runs:
            places.append({"place": "flow_run", "id": str(run.id), "strings": _strings(run.parameters)
                           + [run.name or ""] + _strings(run.state.message if run.state else None)})
        for task in _pages(client.read_task_runs, flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids))):
            places.append({"place": "task_run", "id": str(task.id), "strings": [task.name or ""]
                           + _strings(task.state.message if task.state else None)
                           + _strings(json.loads(task.model_dump_json(include={"task_inputs"})))})
        for entry in _pages(client.read_logs, log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids))):
            places.append({"place": "log", "id": str(entry.id), "strings": [entry.message or ""]})
        for artifact in _pages(client.read_artifacts,
                               artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=run_ids))):
            places.append({"place": "artifact", "id": str(artifact.id),
                           "strings": _strings(artifact.data) + [artifact.description or ""]})
    return places


def configured_reader():  # noqa: ANN201
    """:func:`request_run_records` when a Prefect API is configured (``PREFECT_API_URL``), else None."""
    import os

    return request_run_records if os.environ.get("PREFECT_API_URL") else None
