"""/v1/audit: a request's timeline, deadlines, a subject's lineage, what an
ensemble version reflects. Audit scope; each route calls one query of
``db.audit_queries``."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from api.deps import ApiError, Caller, EngineDep, SecretKeyDep, SessionDep, SettingsDep, require_scope
from api.schemas import INVALID, UNAUTHORIZED, error_responses
from api.schemas_audit import (
    MAX_WITHIN_DAYS,
    DatasetName,
    DueReportOut,
    EnsembleReflectionsOut,
    RequestTimelineOut,
    ResidueReportOut,
    ScreenReferenceOut,
    SubjectIn,
    SubjectLineageOut,
)
from db.audit_queries import (
    AuditNotFound,
    AuditQueryError,
    DueReport,
    EnsembleReflections,
    RequestTimeline,
    SubjectLineage,
    due_requests,
    ensemble_reflections,
    request_timeline,
    subject_lineage,
)
from pipeline.lifecycle import OPEN_STATES
from pipeline.screening import REFERENCE_PATTERN, ScreenReference, resolve_screen_reference

PREFIX = "/v1/audit"
_ERRORS = error_responses(UNAUTHORIZED, {403: "The token lacks the audit scope"}, INVALID)
_NOT_FOUND = error_responses({404: "No such request, dataset or ensemble version"})

AuditCaller = Annotated[Caller, Depends(require_scope("audit"))]
router = APIRouter(prefix=PREFIX, tags=["audit"], responses=_ERRORS)


@contextmanager
def _answers() -> Iterator[None]:
    """The queries' errors as the API's error answers (404, 422)."""
    try:
        yield
    except AuditNotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    except AuditQueryError as exc:
        raise ApiError(422, "validation_error", str(exc)) from None


@router.get("/requests/due", response_model=DueReportOut, summary="Overdue open requests and those due soon")
def due(
    caller: AuditCaller,
    session: SessionDep,
    within_days: Annotated[int, Query(ge=0, le=MAX_WITHIN_DAYS, description="The window for 'due soon', in days.")] = 7,
) -> DueReport:
    with _answers():
        return due_requests(session, open_states=OPEN_STATES, within_days=within_days)


@router.get("/requests/{request_id}/residue", response_model=ResidueReportOut, responses=_NOT_FOUND,
            summary="The residue check: files, live shard versions, database and Prefect, without the erased text")
def residue(
    request_id: uuid.UUID,
    caller: AuditCaller,
    settings: SettingsDep,
    engine: EngineDep,
    prefect: Annotated[bool, Query(description="Also read Prefect's records of the request's runs.")] = True,
) -> dict:
    from flows.prefect_records import configured_reader
    from pipeline.lifecycle import RequestNotFound
    from pipeline.residue import check_residue

    try:
        return check_residue(settings, engine, str(request_id), prefect_records=configured_reader() if prefect else None)
    except RequestNotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None


@router.get("/requests/{request_id}/timeline", response_model=RequestTimelineOut,
            summary="A request's timeline: audit log and state history", responses=_NOT_FOUND)
def timeline(request_id: uuid.UUID, caller: AuditCaller, session: SessionDep) -> RequestTimeline:
    with _answers():
        return request_timeline(session, str(request_id))


@router.post("/subject", response_model=SubjectLineageOut, responses=_NOT_FOUND,
             summary="Every record of a subject and every shard version, checkpoint and ensemble that held it")
def subject(body: SubjectIn, caller: AuditCaller, session: SessionDep, secret_key: SecretKeyDep) -> SubjectLineage:
    """Identifiers travel in the body (URLs are logged); they are hashed with the
    server's key and not kept."""
    with _answers():
        return subject_lineage(session, body.keyed_hashes(secret_key), dataset=body.dataset)


@router.get("/screen-references/{reference}", response_model=ScreenReferenceOut,
            responses=error_responses({404: "No tombstone has this reference"}),
            summary="What a /v1/screen reference stands for: the dataset, erasure request and record")
def screen_reference(
    reference: Annotated[str, Path(min_length=36, max_length=36, pattern=REFERENCE_PATTERN)],
    caller: AuditCaller,
    settings: SettingsDep,
    engine: EngineDep,
) -> ScreenReference:
    """The screen scope only learns "blocked" and this opaque reference; the audit scope
    maps it back to the erasure request and record (nothing about the screened text)."""
    try:
        return resolve_screen_reference(settings, reference, engine=engine)
    except LookupError as exc:
        raise ApiError(404, "not_found", str(exc)) from None


@router.get("/ensembles/{version_id}", response_model=EnsembleReflectionsOut, responses=_NOT_FOUND,
            summary="The erasure requests an ensemble version reflects, and those whose data it still holds")
def ensemble(
    version_id: Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")],
    caller: AuditCaller,
    session: SessionDep,
    dataset: Annotated[DatasetName | None, Query(description="The dataset, when the id exists in several.")] = None,
) -> EnsembleReflections:
    with _answers():
        return ensemble_reflections(session, version_id, dataset=dataset)
