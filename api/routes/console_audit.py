"""/console/audit and /console/datasets: the auditor's pages.

The chain check runs only when asked (a POSTed form: it reads the whole log); the
subject lookup takes identifiers from a POSTed form, never from a URL (URLs are
logged), hashes them with the server's key and shows ids and counts only.
Each route calls one query of ``db.audit_queries`` / ``db.console_queries``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Path, Query, Request
from fastapi.responses import Response

from api.console_pages import PREFIX, AuditAction, Auditor, Reader, render
from api.deps import SecretKeyDep, SessionDep
from db.audit import verify_chain
from db.audit_queries import AuditNotFound, AuditQueryError, due_requests, ensemble_reflections, subject_lineage
from db.console_queries import dataset_lineages
from pipeline.lifecycle import IDENTIFIER_KINDS, OPEN_STATES, InvalidRequest, hash_identifiers
from pipeline.lineage_picture import lineage_svg

router = APIRouter(prefix=PREFIX, include_in_schema=False)
MAX_LOOKUP_IDENTIFIERS = 5


def _audit_page(request: Request, user: object, session: SessionDep, status: int = 200, **extra: object) -> Response:
    return render(request, "audit.html", user, status=status, due=due_requests(session, open_states=OPEN_STATES),
                  lineages=dataset_lineages(session), kinds=IDENTIFIER_KINDS, lookup_rows=MAX_LOOKUP_IDENTIFIERS,
                  **extra)


@router.get("/audit")
def audit(request: Request, user: Auditor, session: SessionDep) -> Response:
    return _audit_page(request, user, session)


@router.post("/audit/chain")
def chain_check(request: Request, user: AuditAction, session: SessionDep) -> Response:
    return _audit_page(request, user, session, chain=verify_chain(session))


@router.post("/audit/subject")
async def subject_lookup(request: Request, user: AuditAction, session: SessionDep, key: SecretKeyDep,
                         dataset: Annotated[str, Form(max_length=200)] = "") -> Response:
    form = await request.form()
    pairs = [(str(form.get(f"kind{i}", "")), str(form.get(f"value{i}", "")).strip())
             for i in range(MAX_LOOKUP_IDENTIFIERS)]
    pairs = [(kind, value) for kind, value in pairs if value]
    try:
        if not pairs:
            raise InvalidRequest("type at least one identifier", "identifiers")
        found = subject_lineage(session, hash_identifiers(key, pairs), dataset=dataset or None)
    except (InvalidRequest, AuditQueryError) as exc:
        return _audit_page(request, user, session, status=422, lookup_error=str(exc))
    except AuditNotFound as exc:
        return _audit_page(request, user, session, status=404, lookup_error=str(exc))
    return _audit_page(request, user, session, lineage=found, asked=len(pairs))


@router.get("/audit/ensembles/{version_id}")
def ensemble(request: Request, user: Auditor, session: SessionDep,
             version_id: Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")],
             dataset: Annotated[str | None, Query(max_length=200)] = None) -> Response:
    try:
        reflections = ensemble_reflections(session, version_id, dataset=dataset)
    except (AuditNotFound, AuditQueryError) as exc:
        return render(request, "denied.html", user, status=404, message=str(exc), back=f"{PREFIX}/audit")
    return render(request, "ensemble.html", user, reflections=reflections)


@router.get("/datasets")
def datasets(request: Request, user: Reader, session: SessionDep) -> Response:
    lineages = dataset_lineages(session)
    return render(request, "datasets.html", user, lineages=lineages,
                  pictures={lineage.name: lineage_svg(lineage) for lineage in lineages})
