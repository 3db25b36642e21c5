"""Starting processing after intake, off the request path.

The route commits the request, answers, and hands the id to a ``RunStarter``: one
background thread per API process takes ids from a bounded queue and starts the
processing deployment for each (``flows.dispatch.start_processing_run``, the request
id as idempotency key). Intake never waits for Prefect and never fails because of
it: when the server cannot be reached or the deployment does not exist, the failure
is logged (the request id and the error's class, nothing the subject gave), the
request stays ``received``, and the scheduled sweep (``flows/sweep.py``) starts it
later. After a failure, starts are skipped for ``PAUSE_AFTER_FAILURE_S`` so that a
burst against a dead server does not queue up behind timeouts (the sweep covers
those too). An id that waited in the queue longer than ``max_age_s`` (half the
sweep's grace period for received requests) is left to the sweep as well, so the
two never start the same request at once.

Throughput: a start is one flow-run creation on the Prefect server, about 16/s
against a local SQLite-backed server on 2 shared cores (the server is the limit: a
persistent client is no faster). A burst faster than that queues (up to
``QUEUE_SIZE`` ids per API process) and drains; intake itself is not slowed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

log = logging.getLogger("erasure.api.dispatch")

QUEUE_SIZE = 10_000
PAUSE_AFTER_FAILURE_S = 30.0
_STOP = object()


class RunStarter:
    """Starts ``deployment`` for each enqueued request id, in one background thread."""

    def __init__(self, deployment: str, max_age_s: float | None = None) -> None:
        self.deployment = deployment
        self.max_age_s = max_age_s
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_SIZE)
        self.thread: threading.Thread | None = None
        self.paused_until = 0.0
        self.started = self.failed = self.skipped = self.reported_skipped = 0

    def start(self) -> None:
        from flows.dispatch import prefect_server_configured  # Prefect loads here, not at import

        if not prefect_server_configured():
            log.warning("PREFECT_API_URL is not set: new requests stay received until the sweep or an operator "
                        "starts them (ERASURE_PROCESS_DEPLOYMENT=%s)", self.deployment)
            return
        self.thread = threading.Thread(target=self._run, name="erasure-run-starter", daemon=True)
        self.thread.start()

    def enqueue(self, request_id: str, idempotency_key: str | None = None) -> None:
        """Never blocks: a full queue (or no Prefect server) leaves the request to the sweep.
        ``idempotency_key`` defaults to the request id (one run per intake)."""
        if self.thread is None:
            return
        try:
            self.queue.put_nowait((request_id, idempotency_key, time.monotonic()))
        except queue.Full:
            self.skipped += 1
            log.warning("run starter queue full: request %s left to the sweep", request_id)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop after the ids queued so far (at most ``timeout_s``); any left are the sweep's."""
        if self.thread is None:
            return
        try:
            self.queue.put(_STOP, timeout=timeout_s)
        except queue.Full:
            pass
        self.thread.join(timeout_s)

    def _run(self) -> None:
        from flows.dispatch import start_processing_run

        while (item := self.queue.get()) is not _STOP:
            request_id, idempotency_key, queued_at = item
            now = time.monotonic()
            if now < self.paused_until or (self.max_age_s is not None and now - queued_at > self.max_age_s):
                self.skipped += 1
                continue
            if self.skipped > self.reported_skipped:
                log.warning("%d request(s) left to the sweep (starts paused after a failure, or queued longer "
                            "than %s s)", self.skipped - self.reported_skipped, self.max_age_s)
                self.reported_skipped = self.skipped
            try:
                start_processing_run(self.deployment, request_id, idempotency_key)
                self.started += 1
            except Exception as exc:  # noqa: BLE001 - intake must survive any Prefect failure; logged, sweep retries
                self.failed += 1
                self.paused_until = time.monotonic() + PAUSE_AFTER_FAILURE_S
                log.warning("could not start %s for request %s (%s); it stays received and the sweep will start "
                            "it; further starts paused for %.0f s", self.deployment, request_id,
                            type(exc).__name__, PAUSE_AFTER_FAILURE_S)
