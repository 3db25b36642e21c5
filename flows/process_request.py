"""``process_erasure_request``: one request from receipt to completion.

    locate in every dataset -> record matches -> human review of borderline matches
           -> erase in every dataset
           -> retrain now (or leave it to the scheduled ``retrain_pending``)
           -> verify each new ensemble's training manifest -> membership probe
           -> complete -> certify (a section per dataset)

A request is processed against every dataset, or the datasets it named at
intake, or the one ``dataset`` an operator names.

Verification checks the manifest, then runs the membership-inference probe
(``pipeline/membership.py``) before completing; a completed request then gets its
signed certificate (``pipeline/certificate.py``). Both are stored once: a rerun of
the flow, or of ``finish_waiting_requests``, issues a certificate that a crash
after completion left unissued.

Every step reads the request's state and recorded matches first and does only
what is left, so running the flow again after a crash (or a ``kill -9``) at any
point finishes with the same result: nothing is erased twice, no shard version
is lost, no request stays stuck.

Review. Borderline matches (policy decision ``review``) need a person. The flow
pauses (``pause_flow_run``) for a typed input: none at all when the decisions
were recorded through the API (``POST .../review-decisions`` or ``erasure
request review``) — resuming then re-reads them; or decisions ``[{match_ref,
decision}]`` with the ``ticket`` the API issued for exactly them (``POST
.../review-tickets``, review scope): the ticket names the reviewer the API
authenticated. Decisions without a valid ticket are not applied: the refusal is
logged (``review.resume_refused``) and the run pauses again. The timeout policy (``on_review_timeout``): ``leave`` (default) ends this
run with the request ``awaiting_review``, and a later run continues once the
decisions exist; ``keep`` / ``erase`` decide what no reviewer did; ``fail``
fails the request. ``review_timeout_s <= 0`` applies the policy without pausing.

The flow's parameters are ids and options only, never identifiers or texts;
its tasks return ids and counts (Prefect keeps both in its own database).
"""

# No `from __future__ import annotations`: a deployment's run loads this file under another module
# name, where Prefect cannot resolve string annotations (`Literal`) to validate the parameters.
import flows.prefect_setup  # noqa: F401  (our Prefect defaults, before prefect is imported)

import re
from typing import Literal

from prefect import flow, get_run_logger, pause_flow_run, task
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.input import RunInput
from pydantic import BaseModel, Field

from flows.retraining import dispatch_retraining
from flows.retries import RETRY
from pipeline import processing
from pipeline.lifecycle import CLOSED_STATES, RequestState
from pipeline.erasure import crash_point
from pipeline.extraction import extraction_markdown
from pipeline.membership import probe_markdown, report_path
from db.settings import load_settings

S = RequestState


class ReviewDecisionIn(BaseModel):
    match_ref: str = Field(min_length=1, max_length=200)
    decision: Literal["erase", "keep"]


class ReviewDecisionsInput(RunInput):
    """What resumes a paused review: none when the decisions were recorded through the
    API; else the decisions with the API's review ticket for exactly them. There is no
    reviewer field (the ticket names the reviewer) and no note (Prefect keeps run inputs:
    a note goes through the API, into the request's notes)."""

    decisions: list[ReviewDecisionIn] = Field(default_factory=list, max_length=10_000)
    ticket: str | None = Field(default=None, max_length=4_000)


# ---------------------------------------------------------------- tasks


@task(name="start-processing", result_serializer="json", **RETRY)
def start_processing(request_id: str) -> str:
    """received -> locating; any other state is left as it is (a rerun)."""
    return processing.start_processing(request_id)


@task(name="datasets-to-process", result_serializer="json", **RETRY)
def datasets_to_process(request_id: str, dataset: str | None) -> list[str]:
    """``dataset``, else the datasets the request named, else every dataset (names)."""
    return processing.datasets_to_process(request_id, dataset)


@task(name="locate-and-record", result_serializer="json", **RETRY)
def locate_and_record(request_id: str, dataset: str) -> dict:
    """Locate the subject's records in one dataset and store the matches."""
    return processing.locate_and_record(request_id, dataset)


@task(name="decide-after-locating", result_serializer="json", **RETRY)
def decide_after_locating(request_id: str) -> dict:
    """Every dataset searched: awaiting_review (borderline matches), erasing, or completed."""
    return processing.decide_after_locating(request_id)


@task(name="apply-review", result_serializer="json", **RETRY)
def apply_review(request_id: str, decisions: list[dict], ticket: str | None) -> dict:
    """Record decisions given with a resume (only with a valid review ticket), then move
    on if every match is decided."""
    return processing.apply_review(request_id, decisions, ticket)


@task(name="review-timeout", result_serializer="json", **RETRY)
def apply_review_timeout(request_id: str, policy: str) -> str:
    return processing.apply_review_timeout(request_id, policy)


@task(name="erase-records", result_serializer="json", **RETRY)
def erase_records(request_id: str, dataset: str) -> dict:
    """New shard versions of one dataset without the records (one per affected shard,
    each under the shard's lock)."""
    return processing.erase_records(request_id, dataset)


@task(name="finish-erasing", result_serializer="json", **RETRY)
def finish_erasing(request_id: str) -> dict:
    """Every dataset erased: awaiting_retrain (or verifying when no model saw the shards)."""
    return processing.finish_erasing(request_id)


@task(name="shards-awaiting-retraining", result_serializer="json", **RETRY)
def shards_awaiting_retraining(request_id: str, dataset: str) -> list[int]:
    return processing.shards_awaiting_retraining(request_id, dataset)


@task(name="verify-and-complete", result_serializer="json", **RETRY)
def verify_and_complete(request_id: str) -> dict:
    """Once every retraining it waits for is done: verify each dataset's ensemble in
    service was trained on none of the erased records, measure membership before and
    after (outside any transaction), then complete (samples are purged). Each step is
    idempotent, so a rerun after a crash between any two does the rest."""
    result = processing.verify_and_complete(request_id)
    for dataset, summaries in (result["membership"] or {}).items():
        publish_probe_artifact(request_id, dataset, summaries)
    for dataset, details in (result.get("extraction") or {}).items():
        publish_extraction_artifact(request_id, dataset, details)
    return result


@task(name="certify", result_serializer="json", **RETRY)
def certify(request_id: str) -> dict | None:
    """Issue the signed certificate of a completed request, a section per dataset (once;
    a rerun returns the stored one); None while the request is not completed."""
    from flows.prefect_records import request_run_records

    return processing.certify(request_id, prefect_records=request_run_records)  # the residue check reads Prefect too


def publish_probe_artifact(request_id: str, dataset: str, summaries: list[dict]) -> None:
    """A markdown artifact ``membership-<request id>-<dataset>``: one dataset's probe figures and plot."""
    png = report_path(load_settings(), request_id, dataset)
    # an artifact key holds lowercase letters, digits and dashes only
    key = re.sub(r"[^a-z0-9-]", "-", f"membership-{request_id}-{dataset}".lower())
    try:
        create_markdown_artifact(key=key,
                                 markdown=probe_markdown(request_id, summaries,
                                                         png.read_bytes() if png.exists() else b"", dataset),
                                 description="membership-inference probe before and after retraining (counts only)")
    except Exception as exc:  # noqa: BLE001 - an artifact is a convenience (the database holds the record): warn, go on
        get_run_logger().warning("artifact not written: %s", type(exc).__name__)


def publish_extraction_artifact(request_id: str, dataset: str, details: dict) -> None:
    """A markdown artifact ``extraction-<request id>-<dataset>``: the front-end probe's rates and plot."""
    key = re.sub(r"[^a-z0-9-]", "-", f"extraction-{request_id}-{dataset}".lower())
    try:
        create_markdown_artifact(key=key, markdown=extraction_markdown(request_id, details),
                                 description="extraction probe before and after retraining (counts only)")
    except Exception as exc:  # noqa: BLE001 - an artifact is a convenience (the audit log holds the record): warn, go on
        get_run_logger().warning("artifact not written: %s", type(exc).__name__)


def publish_artifact(summary: dict) -> None:
    """A markdown table per request (ids and counts only), key ``erasure-request-<id>``."""
    lines = [f"# Erasure request {summary['request_id']}", "", f"State **{summary['state']}**, due {summary['due_at']}.",
             "", "| method | found | erased | kept |", "|---|---:|---:|---:|"]
    lines += [f"| {method} | {c['found']} | {c['erased']} | {c['kept']} |" for method, c in summary["by_method"].items()]
    lines += ["", "| shard | erased | slices | new shard version |", "|---:|---:|---|---:|"]
    lines += [f"| {s['shard']} | {s['erased']} | {', '.join(map(str, s['slices']))} | {s['new_version']} |"
              for s in summary["shards"]]
    lines += ["", "| shard | retraining | from slice | samples | share of the shard | ensemble |",
              "|---:|---|---:|---:|---:|---|"]
    lines += [f"| {j['shard']} | {j['status']} | {j['retrained_from_slice']} | {j['samples_processed']} | "
              f"{j['fraction_of_shard']} | {(j['ensemble_version'] or '')[:12]} |" for j in summary["retraining"]]
    try:
        create_markdown_artifact(key=f"erasure-request-{summary['request_id']}".lower(), markdown="\n".join(lines),
                                 description="what was found, erased and retrained (counts only)")
    except Exception as exc:  # noqa: BLE001 - an artifact is a convenience (the database holds the record): warn, go on
        get_run_logger().warning("artifact not written: %s", type(exc).__name__)


# ---------------------------------------------------------------- flows


@flow(name="process-erasure-request")
def process_erasure_request(
    request_id: str,
    dataset: str | None = None,
    retrain: Literal["now", "scheduled"] = "now",
    review_timeout_s: int = 3600,
    on_review_timeout: Literal["leave", "keep", "erase", "fail"] = "leave",
    review_poll_s: int = 10,
) -> dict:
    """locate -> review -> erase -> retrain -> verify -> complete -> certify, in every dataset
    (``dataset``: only that one); a rerun resumes."""
    state = start_processing(request_id)
    if state in CLOSED_STATES or state == S.FAILED:
        certify(request_id)  # a completed request whose certificate a crash left unissued gets it now
        return processing.request_summary(request_id)
    datasets = datasets_to_process(request_id, dataset)
    for name in datasets:
        locate_and_record(request_id, name)
    located = decide_after_locating(request_id)
    crash_point("after:locate")
    if located["state"] == S.AWAITING_REVIEW:
        if not wait_for_review(request_id, review_timeout_s, on_review_timeout, review_poll_s):
            summary = processing.request_summary(request_id)
            publish_artifact(summary)
            return summary
    for name in datasets:
        erase_records(request_id, name)
    finish_erasing(request_id)
    crash_point("after:erase")
    if processing.request_state(request_id) in (S.AWAITING_RETRAIN, S.RETRAINING):
        if retrain == "scheduled":
            summary = processing.request_summary(request_id)
            publish_artifact(summary)
            return summary
        for name in datasets:
            dispatch_retraining(name, shards_awaiting_retraining(request_id, name))
        crash_point("after:retrain")
    verify_and_complete(request_id)
    crash_point("after:verify")
    certify(request_id)
    summary = processing.request_summary(request_id)
    publish_artifact(summary)
    return summary


def wait_for_review(request_id: str, timeout_s: int, policy: str, poll_s: int) -> bool:
    """Pause until every borderline match is decided; False when the run ends waiting."""
    attempt = 0
    while True:
        review = apply_review(request_id, [], None)
        if review["state"] != S.AWAITING_REVIEW:
            return review["state"] not in (S.FAILED,)
        if timeout_s <= 0:
            break
        attempt += 1
        try:
            answer = pause_flow_run(wait_for_input=ReviewDecisionsInput, timeout=timeout_s, poll_interval=poll_s,
                                    key=f"review-{attempt}")
        except FlowPauseTimeout:
            break
        decisions = [d.model_dump() for d in answer.decisions] if answer is not None else []
        if decisions:
            # refused without a valid ticket: nothing applied; the loop pauses again
            apply_review(request_id, decisions, answer.ticket)
    if policy == "leave":
        return False
    return apply_review_timeout(request_id, policy) not in (S.AWAITING_REVIEW, S.FAILED)


@task(name="waiting-requests", result_serializer="json", **RETRY)
def _waiting_requests(dataset: str | None) -> list[str]:
    return processing.waiting_requests(dataset)


def finish_waiting_requests(dataset: str | None = None) -> list[dict]:
    """Verify, complete and certify every request whose retraining is done (used by
    ``retrain_pending``), and finish those a crash left verifying or uncertified."""
    finished = []
    for request_id in _waiting_requests(dataset):
        result = verify_and_complete(request_id)
        certify(request_id)
        if result["state"] in (S.COMPLETED, S.FAILED):
            summary = processing.request_summary(request_id)
            publish_artifact(summary)
            finished.append({"request_id": request_id, "state": result["state"]})
    return finished
