"""Starting a request's processing run on its deployment (from the API after intake, and
from the sweep): the run is created on the Prefect server and picked up by a worker or a
``serve`` process; nothing here waits for it."""

from __future__ import annotations

import flows.prefect_setup  # noqa: F401  (our Prefect defaults, before prefect is imported)

from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL


def prefect_server_configured() -> bool:
    """Whether PREFECT_API_URL names a server: without one, Prefect would start a temporary
    server inside the caller, which a long-lived process must not do for a single run."""
    return bool(PREFECT_API_URL.value())


def start_processing_run(deployment: str, request_id: str, idempotency_key: str | None = None) -> str:
    """Create a flow run of ``deployment`` for one request (parameters: the id only) and
    return its id. The idempotency key (default: the request id) makes a second call return
    the same run. Raises when the server cannot be reached or the deployment does not exist."""
    run = run_deployment(deployment, parameters={"request_id": request_id}, timeout=0,
                         idempotency_key=idempotency_key or request_id, as_subflow=False)
    return str(run.id)
