"""``process_erasure_request``: one request from receipt to completion.

    locate -> record matches -> human review of borderline matches -> erase
           -> retrain now (or leave it to the scheduled ``retrain_pending``)
           -> verify the new ensemble's training manifest -> membership probe
           -> complete -> certify

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
pauses (``pause_flow_run``) for a typed input: decisions ``[{match_ref,
decision}]``, or none at all when the decisions were recorded through the API
(``POST .../review`` or ``erasure request review``) — resuming then re-reads
them. The timeout policy (``on_review_timeout``): ``leave`` (default) ends this
run with the request ``awaiting_review``, and a later run continues once the
decisions exist; ``keep`` / ``erase`` decide what no reviewer did; ``fail``
fails the request. ``review_timeout_s <= 0`` applies the policy without pausing.

The flow's parameters are ids and options only, never identifiers or texts;
its tasks return ids and counts (Prefect keeps both in its own database).
"""

from __future__ import annotations

import flows.prefect_setup  # noqa: F401  (our Prefect defaults, before prefect is imported)

from typing import Literal

from prefect import flow, pause_flow_run, task
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.input import RunInput
from pydantic import BaseModel, Field

from flows.retraining import dispatch_retraining
from flows.retries import RETRY
from pipeline import processing
from pipeline.lifecycle import CLOSED_STATES, RequestState
from pipeline.erasure import crash_point
from pipeline.membership import probe_markdown, report_path
from db.settings import load_settings

S = RequestState


class ReviewDecisionIn(BaseModel):
    match_ref: str = Field(min_length=1, max_length=200)
    decision: Literal["erase", "keep"]


class ReviewDecisionsInput(RunInput):
    """What resumes a paused review: decisions, or none when they were recorded through the API."""

    decisions: list[ReviewDecisionIn] = Field(default_factory=list)
    reviewer: str = "prefect"
    note: str | None = None


# ---------------------------------------------------------------- tasks


@task(name="start-processing", result_serializer="json", **RETRY)
def start_processing(request_id: str) -> str:
    """received -> locating; any other state is left as it is (a rerun)."""
    return processing.start_processing(request_id)


@task(name="locate-and-record", result_serializer="json", **RETRY)
def locate_and_record(request_id: str, dataset: str) -> dict:
    """Locate the subject's records and store the matches, in one transaction with
    the next state: awaiting_review (borderline matches), erasing, or completed."""
    return processing.locate_and_record(request_id, dataset)


@task(name="apply-review", result_serializer="json", **RETRY)
def apply_review(request_id: str, decisions: list[dict], reviewer: str, note: str | None) -> dict:
    """Record decisions given with a resume (if any), then move on if every match is decided."""
    return processing.apply_review(request_id, decisions, reviewer, note)


@task(name="review-timeout", result_serializer="json", **RETRY)
def apply_review_timeout(request_id: str, policy: str) -> str:
    return processing.apply_review_timeout(request_id, policy)


@task(name="erase-records", result_serializer="json", **RETRY)
def erase_records(request_id: str, dataset: str) -> dict:
    """New shard versions without the records (one per affected shard, each under the
    shard's lock), then awaiting_retrain (or verifying when no model saw the shards)."""
    return processing.erase_records(request_id, dataset)


@task(name="shards-awaiting-retraining", result_serializer="json", **RETRY)
def shards_awaiting_retraining(request_id: str) -> list[int]:
    return processing.shards_awaiting_retraining(request_id)


@task(name="verify-and-complete", result_serializer="json", **RETRY)
def verify_and_complete(request_id: str, dataset: str) -> dict:
    """Once every retraining it waits for is done: verify the ensemble in service
    was trained on none of the erased records, measure membership before and after
    (outside any transaction), then complete (samples are purged). Each step is
    idempotent, so a rerun after a crash between any two does the rest."""
    result = processing.verify_and_complete(request_id, dataset)
    if result["membership"]:
        publish_probe_artifact(request_id, result["membership"])
    return result


@task(name="certify", result_serializer="json", **RETRY)
def certify(request_id: str, dataset: str | None) -> dict | None:
    """Issue the signed certificate of a completed request (once; a rerun returns the
    stored one); None while the request is not completed."""
    return processing.certify(request_id, dataset)


def publish_probe_artifact(request_id: str, summaries: list[dict]) -> None:
    """A markdown artifact ``membership-<request id>``: the probe's figures and plot."""
    png = report_path(load_settings(), request_id)
    try:
        create_markdown_artifact(key=f"membership-{request_id}".lower(),
                                 markdown=probe_markdown(request_id, summaries, png.read_bytes() if png.exists() else b""),
                                 description="membership-inference probe before and after retraining (counts only)")
    except Exception:  # noqa: BLE001 - an artifact is a convenience; the database holds the record
        pass


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
    except Exception:  # noqa: BLE001 - an artifact is a convenience; the database holds the record
        pass


# ---------------------------------------------------------------- flows


@flow(name="process-erasure-request")
def process_erasure_request(
    request_id: str,
    dataset: str,
    retrain: Literal["now", "scheduled"] = "now",
    review_timeout_s: int = 3600,
    on_review_timeout: Literal["leave", "keep", "erase", "fail"] = "leave",
    review_poll_s: int = 10,
) -> dict:
    """locate -> review -> erase -> retrain -> verify -> complete -> certify; a rerun resumes."""
    state = start_processing(request_id)
    if state in CLOSED_STATES or state == S.FAILED:
        certify(request_id, dataset)  # a completed request whose certificate a crash left unissued gets it now
        return processing.request_summary(request_id)
    located = locate_and_record(request_id, dataset)
    crash_point("after:locate")
    if located["state"] == S.AWAITING_REVIEW:
        if not wait_for_review(request_id, review_timeout_s, on_review_timeout, review_poll_s):
            summary = processing.request_summary(request_id)
            publish_artifact(summary)
            return summary
    erase_records(request_id, dataset)
    crash_point("after:erase")
    if processing.request_state(request_id) in (S.AWAITING_RETRAIN, S.RETRAINING):
        if retrain == "scheduled":
            summary = processing.request_summary(request_id)
            publish_artifact(summary)
            return summary
        dispatch_retraining(dataset, shards_awaiting_retraining(request_id))
        crash_point("after:retrain")
    verify_and_complete(request_id, dataset)
    crash_point("after:verify")
    certify(request_id, dataset)
    summary = processing.request_summary(request_id)
    publish_artifact(summary)
    return summary


def wait_for_review(request_id: str, timeout_s: int, policy: str, poll_s: int) -> bool:
    """Pause until every borderline match is decided; False when the run ends waiting."""
    attempt = 0
    while True:
        review = apply_review(request_id, [], "", None)
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
            apply_review(request_id, decisions, answer.reviewer, answer.note)
    if policy == "leave":
        return False
    return apply_review_timeout(request_id, policy) not in (S.AWAITING_REVIEW, S.FAILED)


@task(name="waiting-requests", result_serializer="json", **RETRY)
def _waiting_requests(dataset: str | None) -> list[tuple[str, str]]:
    return processing.waiting_requests(dataset)


def finish_waiting_requests(dataset: str | None = None) -> list[dict]:
    """Verify, complete and certify every request whose retraining is done (used by
    ``retrain_pending``), and finish those a crash left verifying or uncertified."""
    finished = []
    for request_id, name in _waiting_requests(dataset):
        result = verify_and_complete(request_id, name)
        certify(request_id, name)
        if result["state"] in (S.COMPLETED, S.FAILED):
            summary = processing.request_summary(request_id)
            publish_artifact(summary)
            finished.append({"request_id": request_id, "state": result["state"]})
    return finished
