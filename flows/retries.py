"""Retry policy of our Prefect tasks: only faults that may pass are retried."""

from __future__ import annotations

import flows.prefect_setup  # noqa: F401  (our Prefect defaults, before prefect is imported)

from prefect.cache_policies import NONE as NO_CACHE

TRANSIENT_RETRIES = 3


def transient_fault(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's retry_condition_fn signature
    """Retry only what may pass: lost database connections, timeouts, I/O hiccups."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    try:
        state.result()
    except (OperationalError, TimeoutError, ConnectionError):
        return True
    except DBAPIError as exc:
        return bool(exc.connection_invalidated)
    except Exception:  # noqa: BLE001 - anything else is a bug or bad input: fail now, no retry
        return False
    return False


# Our database says what is done, so no Prefect caching: within one run a task
# called twice with the same inputs (e.g. re-reading review decisions) must run twice.
RETRY = dict(retries=TRANSIENT_RETRIES, retry_delay_seconds=[1, 4, 15], retry_condition_fn=transient_fault,
             cache_policy=NO_CACHE, persist_result=False)
