"""/v1/erasure-requests: intake, status, review decisions and tickets, extension, denial.
Each route calls one service of ``pipeline.lifecycle``.

An intake token sees only the requests it submitted: another's answers 404, as
if it did not exist. Review, audit and admin tokens see every request."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from fastapi import APIRouter, BackgroundTasks, Request, Response
from sqlalchemy.orm import Session

from api.deps import EngineDep, IdempotencyKeyHeader, IntakeCaller, ReviewCaller, SecretKeyDep, SessionDep, StatusReader
from api.schemas import (
    INVALID,
    TOO_LARGE,
    UNAUTHORIZED,
    DenialIn,
    ExtensionIn,
    RequestStatusOut,
    ReviewDecisionsIn,
    ReviewTicketIn,
    ReviewTicketOut,
    SubmissionOut,
    SubmitRequestIn,
    error_responses,
)
from pipeline.lifecycle import (
    RequestStatus,
    ReviewInput,
    deny_request,
    describe_request,
    extend_deadline,
    get_request,
    issue_review_ticket,
    record_review_decisions,
    submit_request,
)

PREFIX = "/v1/erasure-requests"
_ERRORS = error_responses(UNAUTHORIZED, TOO_LARGE, INVALID)
_NOT_FOUND = error_responses({404: "No such request"})
_CONFLICT = error_responses({409: "Not allowed in the request's current state"})

router = APIRouter(prefix=PREFIX, tags=["erasure requests"], responses=_ERRORS)


@router.post(
    "",
    status_code=202,
    response_model=SubmissionOut,
    summary="Submit an erasure request",
    responses=error_responses({409: "The Idempotency-Key was used with another body"}),
)
def submit(
    body: SubmitRequestIn,
    idempotency_key: IdempotencyKeyHeader,
    caller: IntakeCaller,
    engine: EngineDep,
    secret_key: SecretKeyDep,
    response: Response,
    http_request: Request,
) -> SubmissionOut:
    """Store the request durably (committed before this answer) and return its
    id. Identifiers are kept only as keyed hashes. Processing then starts by itself
    (the on-demand deployment; if Prefect cannot be reached, the scheduled sweep)."""
    submission = submit_request(
        engine, secret_key, idempotency_key=idempotency_key, identifiers=body.identifier_pairs(),
        samples=body.samples, actor=caller.actor, token_id=caller.token_id, datasets=body.datasets,
    )
    starter = http_request.app.state.run_starter
    if starter is not None and not submission.replayed:
        starter.enqueue(submission.request_id)  # committed above; never blocks, never fails the answer
    location = f"{PREFIX}/{submission.request_id}"
    response.headers["Location"] = location
    if submission.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return SubmissionOut.of(submission, location)


@router.get("/{request_id}", response_model=RequestStatusOut, summary="A request's state, deadline and timeline",
            responses=_NOT_FOUND)
def show(request_id: uuid.UUID, caller: StatusReader, session: SessionDep) -> RequestStatus:
    return describe_request(session, str(request_id),
                            token_id=None if caller.sees_every_request else caller.token_id)


@router.post("/{request_id}/review-decisions", response_model=RequestStatusOut,
             summary="Decide borderline matches (erase or keep)", responses=_NOT_FOUND | _CONFLICT)
def review(request_id: uuid.UUID, body: ReviewDecisionsIn, caller: ReviewCaller, session: SessionDep,
           secret_key: SecretKeyDep, http_request: Request, background: BackgroundTasks) -> RequestStatus:
    """Processing then continues by itself: a run of the processing deployment is started
    once the decisions are committed (one per review: its key counts the timeline)."""
    return decide_and_continue(session, str(request_id), body.as_inputs(), reviewer=caller.actor, key=secret_key,
                               http_request=http_request, background=background)


def decide_and_continue(session: Session, request_id: str, decisions: Sequence[ReviewInput], *, reviewer: str,
                        key: bytes, http_request: Request, background: BackgroundTasks) -> RequestStatus:
    """Record review decisions, then start the processing run that carries the request on.
    The one path of a decision, from the API and from the console alike."""
    status = record_review_decisions(session, request_id, decisions, reviewer=reviewer, key=key)
    starter = http_request.app.state.run_starter
    if starter is not None:
        # a background task runs after the answer, so after this route's transaction commits
        background.add_task(starter.enqueue, status.id, f"{status.id}:review:{len(status.history)}")
    return status


@router.post("/{request_id}/review-tickets", response_model=ReviewTicketOut, status_code=201,
             summary="A ticket to resume a paused review in Prefect with these decisions", responses=_NOT_FOUND)
def review_ticket(request_id: uuid.UUID, body: ReviewTicketIn, caller: ReviewCaller, session: SessionDep,
                  secret_key: SecretKeyDep) -> ReviewTicketOut:
    """The flow run applies decisions given with a resume only with this ticket: it
    names this token as the reviewer and holds for exactly these decisions."""
    get_request(session, str(request_id))  # 404 for an unknown request
    ticket, expires = issue_review_ticket(secret_key, str(request_id), caller.actor, body.pairs())
    return ReviewTicketOut(ticket=ticket, reviewer=caller.actor, expires_at=expires)


@router.post("/{request_id}/extension", response_model=RequestStatusOut,
             summary="Extend the deadline by up to two months (Art. 12(3))", responses=_NOT_FOUND | _CONFLICT)
def extend(request_id: uuid.UUID, body: ExtensionIn, caller: ReviewCaller, session: SessionDep,
           secret_key: SecretKeyDep) -> RequestStatus:
    return extend_deadline(session, str(request_id), months=body.months, reason=body.reason, actor=caller.actor,
                           key=secret_key)


@router.post("/{request_id}/denial", response_model=RequestStatusOut,
             summary="Deny the request under an Art. 17(3) ground", responses=_NOT_FOUND | _CONFLICT)
def deny(request_id: uuid.UUID, body: DenialIn, caller: ReviewCaller, session: SessionDep,
         secret_key: SecretKeyDep) -> RequestStatus:
    return deny_request(session, str(request_id), ground=body.ground, detail=body.detail, actor=caller.actor,
                        key=secret_key)
