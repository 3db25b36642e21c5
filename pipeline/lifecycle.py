"""Erasure requests: intake, the state machine, deadlines, denial, review.

(Not named ``requests.py``: Prefect puts a flow file's folder on ``sys.path``
when it loads an entrypoint, and a ``requests`` module there shadows the
HTTP library that docker and others import.)

The life of a request (``ALLOWED_TRANSITIONS`` is the one authority)::

    received -> locating -> awaiting_review -> erasing -> awaiting_retrain -> retraining -> verifying -> completed
         \\__________\\_______________\\____> denied   (Art. 17(3) ground, before erasure starts)
    any open state ------------------------> failed   (reason required; failed -> received reopens)

Deadline (Art. 12(3)): due = received + one calendar month; when the target
month is shorter the deadline is its last day (31 Jan -> 28/29 Feb). That is the
same instant of day, a little earlier than the legal end of that day, so it errs
on the safe side. An extension by up to two further months in total needs a
reason and must be decided within the first month (the subject has to be told
within it); the new deadline is received + 1 + extension months, computed from
the receipt again, never chained from an already-clipped date.

Identifiers are kept only as keyed hashes; sample texts only in
``request_samples``, deleted when the request closes (completed or denied).
Every change appends to the request's timeline (``request_events``) and to the
hash-chained audit log, both with codes and counts only. Text a person types
(an extension reason, a denial's reasoning, a reviewer's note, an operator's
reason, the match references a review names) is a ``RequestNote``: the audit
event keeps its id and keyed hash (``note_hmac``), and ``purge_notes`` deletes
the notes of requests closed longer than their retention period.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import hmac
import json
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import StrEnum

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, object_session

from db.models import utcnow
from db.audit import ACTOR, append_event, note_hmac, prepare_event
from db.requests import (
    ErasureRequest,
    NoteKind,
    RequestEvent,
    RequestNote,
    ReviewDecision,
    insert_request,
)
from db.session import unit_of_work
# IDENTIFIER_KINDS is also read from here by api/ (which does not import dedup/).
from dedup.identifiers import IDENTIFIER_KINDS, keyed_hash, normalize_identifier

MAX_IDENTIFIERS = 50
MAX_IDENTIFIER_CHARS = 1_000
MAX_SAMPLES = 20
MAX_SAMPLE_CHARS = 20_000
MAX_IDEMPOTENCY_KEY_CHARS = 200
MAX_EXTENSION_MONTHS = 2
MAX_REASON_CHARS = 4_000
# How long a closed request's notes are kept before ``purge_notes`` deletes them
# (the time within which the handling of the request may be questioned).
DEFAULT_NOTES_RETENTION = timedelta(days=365)


class RequestState(StrEnum):
    RECEIVED = "received"
    LOCATING = "locating"
    AWAITING_REVIEW = "awaiting_review"
    ERASING = "erasing"
    AWAITING_RETRAIN = "awaiting_retrain"
    RETRAINING = "retraining"
    VERIFYING = "verifying"
    COMPLETED = "completed"
    DENIED = "denied"
    FAILED = "failed"


# from-state -> {to-state: when this transition is taken}
ALLOWED_TRANSITIONS: dict[RequestState, dict[RequestState, str]] = {
    RequestState.RECEIVED: {
        RequestState.LOCATING: "processing starts: identifier, near-duplicate and embedding search",
        RequestState.DENIED: "refused under an Art. 17(3) ground before any search (deny_request)",
        RequestState.FAILED: "processing could not start",
    },
    RequestState.LOCATING: {
        RequestState.AWAITING_REVIEW: "borderline matches wait for a human decision",
        RequestState.ERASING: "every match is decided by policy; erasure starts",
        RequestState.COMPLETED: "nothing of the subject was found; nothing to erase",
        RequestState.DENIED: "refused under an Art. 17(3) ground once the matches are known (deny_request)",
        RequestState.FAILED: "the search failed",
    },
    RequestState.AWAITING_REVIEW: {
        RequestState.ERASING: "the reviewer decided every borderline match",
        RequestState.COMPLETED: "the reviewer kept every match; nothing to erase",
        RequestState.DENIED: "refused under an Art. 17(3) ground after review (deny_request)",
        RequestState.FAILED: "the review could not be completed",
    },
    RequestState.ERASING: {
        RequestState.AWAITING_RETRAIN: "records removed from the shards; the affected sub-models wait for retraining",
        RequestState.VERIFYING: "records removed; no trained model saw them, so nothing to retrain",
        RequestState.FAILED: "the shard rewrite failed (the previous shard versions stay in use)",
    },
    RequestState.AWAITING_RETRAIN: {
        RequestState.RETRAINING: "the scheduled retraining of the affected shards started",
        RequestState.FAILED: "retraining could not be scheduled",
    },
    RequestState.RETRAINING: {
        RequestState.VERIFYING: "every affected sub-model was retrained from its checkpoint",
        RequestState.AWAITING_RETRAIN: "the retraining run was interrupted; it waits for the next run",
        RequestState.FAILED: "retraining failed",
    },
    RequestState.VERIFYING: {
        RequestState.COMPLETED: "manifest and membership checks passed; certificate issued; samples purged",
        RequestState.FAILED: "verification failed",
    },
    RequestState.FAILED: {
        RequestState.RECEIVED: "reopened by an operator for another processing run (reason required)",
    },
    RequestState.COMPLETED: {},
    RequestState.DENIED: {},
}

CLOSED_STATES = frozenset({RequestState.COMPLETED, RequestState.DENIED})
OPEN_STATES = frozenset(RequestState) - CLOSED_STATES
# Decisions on matches make sense once matches exist and before erasure starts.
REVIEWABLE_STATES = frozenset({RequestState.LOCATING, RequestState.AWAITING_REVIEW})
_REASON_REQUIRED = frozenset({RequestState.FAILED, RequestState.RECEIVED})


class DenialGround(StrEnum):
    """The exemptions of Art. 17(3) GDPR."""

    FREEDOM_OF_EXPRESSION = "freedom_of_expression"  # (a) freedom of expression and information
    LEGAL_OBLIGATION = "legal_obligation"  # (b) legal obligation, public-interest task, official authority
    PUBLIC_HEALTH = "public_health"  # (c) public interest in public health (Art. 9(2)(h), (i), 9(3))
    ARCHIVING_RESEARCH = "archiving_research"  # (d) archiving, scientific/historical research, statistics (Art. 89(1))
    LEGAL_CLAIMS = "legal_claims"  # (e) establishment, exercise or defence of legal claims


class ReviewVerdict(StrEnum):
    ERASE = "erase"
    KEEP = "keep"


class TransitionCode(StrEnum):
    """Why a request changed state: what the audit log keeps instead of a sentence."""

    UNSPECIFIED = "unspecified"
    OPERATOR = "operator"  # a person's reason: kept as a request note
    PROCESSING_STARTED = "processing_started"
    MATCHES_TO_REVIEW = "matches_to_review"
    MATCHES_DECIDED = "matches_decided"
    NOTHING_FOUND = "nothing_found"
    REVIEW_COMPLETE = "review_complete"
    REVIEW_TIMEOUT_DECIDED = "review_timeout_decided"
    REVIEW_TIMEOUT_FAILED = "review_timeout_failed"
    RECORDS_ERASED = "records_erased"
    RETRAINING_STARTED = "retraining_started"
    RETRAINED_BY_ANOTHER_RUN = "retrained_by_another_run"
    RETRAINED = "retrained"
    RETRAINING_REFUSED = "retraining_refused"  # the worker's runtime differs from the recorded one
    MANIFEST_CHECK_FAILED = "manifest_check_failed"
    VERIFIED_AND_PURGED = "verified_and_purged"


# ---------------------------------------------------------------- errors


class RequestError(Exception):
    """Base of the errors the entry points turn into 4xx answers / exit status 2."""


class InvalidRequest(RequestError, ValueError):
    """Input that can never be accepted; ``field`` names it (dotted path)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class RequestNotFound(RequestError, LookupError):
    pass


class IdempotencyConflict(RequestError):
    """An idempotency key reused with a different body."""


class RequestConflict(RequestError):
    """The action is not allowed in the request's current state."""


class IllegalTransition(RequestConflict):
    pass


# ---------------------------------------------------------------- values


@dataclass(frozen=True)
class Submission:
    request_id: str
    received_at: datetime
    due_at: datetime  # the initial Art. 12(3) deadline
    replayed: bool  # True when the idempotency key had been seen with the same body


@dataclass(frozen=True)
class ReviewInput:
    match_ref: str
    decision: str
    note: str | None = None


@dataclass(frozen=True)
class EventView:
    at: datetime
    actor: str
    action: str
    from_state: str | None
    to_state: str
    reason: str | None


@dataclass(frozen=True)
class ReviewDecisionView:
    match_ref: str
    decision: str
    reviewer: str
    note: str | None
    decided_at: datetime


@dataclass(frozen=True)
class RequestStatus:
    id: str
    state: str
    received_at: datetime
    original_due_at: datetime
    due_at: datetime
    overdue: bool
    extension_months: int
    extension_reason: str | None  # from the request's notes; None once they are purged
    denial_ground: str | None
    denial_detail: str | None  # from the request's notes; None once they are purged
    submitted_by: str
    identifier_kinds: dict[str, int]
    sample_count: int
    samples_purged_at: datetime | None
    closed_at: datetime | None
    notes_purged_at: datetime | None
    review_decisions: tuple[ReviewDecisionView, ...]
    history: tuple[EventView, ...]


# ---------------------------------------------------------------- deadlines


def add_calendar_months(moment: datetime, months: int) -> datetime:
    """``moment`` plus whole calendar months; the day is clipped to the target
    month's last day (31 Jan + 1 -> 28 Feb, or 29 Feb in a leap year)."""
    index = moment.month - 1 + months
    year, month = moment.year + index // 12, index % 12 + 1
    return moment.replace(year=year, month=month, day=min(moment.day, calendar.monthrange(year, month)[1]))


def due_date(received_at: datetime, extension_months: int = 0) -> datetime:
    return add_calendar_months(received_at, 1 + extension_months)


# ---------------------------------------------------------------- intake


def validate_identifier(kind: str, value: object) -> str:
    """The normalised value; ValueError says what is wrong (no value echoed)."""
    if isinstance(value, str) and len(value) > MAX_IDENTIFIER_CHARS:
        raise ValueError(f"an identifier is at most {MAX_IDENTIFIER_CHARS} characters")
    return normalize_identifier(kind, value)


def hash_identifiers(key: bytes, identifiers: Sequence[tuple[str, object]]) -> list[tuple[str, str]]:
    if len(identifiers) > MAX_IDENTIFIERS:
        raise InvalidRequest(f"at most {MAX_IDENTIFIERS} identifiers per request", "identifiers")
    hashed: list[tuple[str, str]] = []
    for index, (kind, value) in enumerate(identifiers):
        if kind not in IDENTIFIER_KINDS:
            raise InvalidRequest(
                f"unknown identifier kind {kind!r}; known kinds: {', '.join(IDENTIFIER_KINDS)}", f"identifiers.{index}.kind"
            )
        try:
            validate_identifier(kind, value)
        except ValueError as exc:
            raise InvalidRequest(str(exc), f"identifiers.{index}.value") from None
        pair = (kind, keyed_hash(key, kind, value))
        if pair not in hashed:
            hashed.append(pair)
    return hashed


def _check_samples(samples: Sequence[str]) -> None:
    if len(samples) > MAX_SAMPLES:
        raise InvalidRequest(f"at most {MAX_SAMPLES} samples per request", "samples")
    for index, text in enumerate(samples):
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequest("a sample must be a non-empty text", f"samples.{index}")
        if len(text) > MAX_SAMPLE_CHARS:
            raise InvalidRequest(f"a sample is at most {MAX_SAMPLE_CHARS} characters", f"samples.{index}")


def check_idempotency_key(key: str) -> str:
    if not key or len(key) > MAX_IDEMPOTENCY_KEY_CHARS or not all(33 <= ord(c) <= 126 for c in key):
        raise InvalidRequest(
            f"the idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} visible ASCII characters (e.g. a UUID)",
            "Idempotency-Key",
        )
    return key


def _fingerprint(key: bytes, hashed: list[tuple[str, str]], samples: Sequence[str],
                 datasets: list[str] | None = None) -> str:
    """HMAC of the normalised submission: equal for equal content whatever the
    identifiers' order or spelling, and useless without the key."""
    body: dict = {"identifiers": sorted(f"{k}:{h}" for k, h in hashed), "samples": list(samples)}
    if datasets is not None:  # only when named: fingerprints of requests covering every dataset are unchanged
        body["datasets"] = datasets
    canonical = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return hmac.new(key, b"erasure-request-body:" + canonical.encode(), hashlib.sha256).hexdigest()


def submit_request(
    engine: Engine,
    key: bytes,
    *,
    idempotency_key: str,
    identifiers: Sequence[tuple[str, object]],
    samples: Sequence[str],
    actor: str,
    token_id: int | None = None,
    datasets: Sequence[str] | None = None,
    now: datetime | None = None,
) -> Submission:
    """Store a new request, committed when this returns; idempotent by key.

    The same key with the same (normalised) body, from the same API token,
    returns the first request (``replayed``); with another body, or from
    another token, it raises IdempotencyConflict (a token never learns of
    another's request). Two concurrent first submissions of one key race on the
    unique constraint: the loser's insert fails and it returns the winner's request.
    ``token_id``: the submitting API token (None from the CLI). ``datasets``: the names of
    the datasets the request covers (each must exist); None: every dataset.
    """
    check_idempotency_key(idempotency_key)
    _check_actor(actor, "actor")
    hashed = hash_identifiers(key, list(identifiers))
    samples = list(samples)
    _check_samples(samples)
    if not hashed and not samples:
        raise InvalidRequest("give at least one identifier or one sample", "samples")
    named = _check_datasets(datasets)
    fingerprint = _fingerprint(key, hashed, samples, named)
    try:
        # Insert first: a replay is rare, and the unique key catches it (one round trip fewer).
        if named is not None:
            with unit_of_work(engine) as session:
                _check_datasets_exist(session, named)
        received_at = (now or utcnow()).astimezone(timezone.utc)  # calendar months count in UTC
        due = due_date(received_at)
        request_id = str(uuid.uuid4())
        # Core statements, not the ORM: intake is the hot path (one statement on PostgreSQL).
        insert_request(
            engine,
            {"id": request_id, "idempotency_key": idempotency_key, "body_fingerprint": fingerprint,
             "state": RequestState.RECEIVED.value, "received_at": received_at, "original_due_at": due,
             "due_at": due, "extension_months": 0, "submitted_by": actor, "submitted_by_token_id": token_id,
             "identifier_count": len(hashed), "sample_count": len(samples),
             "datasets": json.dumps(named) if named is not None else None, "updated_at": received_at},
            hashed, samples,
            {"at": received_at, "actor": actor, "action": "submitted", "from_state": None,
             "to_state": RequestState.RECEIVED.value,
             "reason": f"{len(hashed)} identifier(s), {len(samples)} sample(s); due {due.isoformat()}"},
            prepare_event("request.submitted", {
                "from_state": None, "to_state": RequestState.RECEIVED.value, "identifiers": len(hashed),
                "samples": len(samples), "due_at": due.isoformat()}, actor=actor, request_id=request_id,
                at=received_at),
        )
        return Submission(request_id, received_at, due, replayed=False)
    except IntegrityError:
        with unit_of_work(engine) as session:
            existing = _by_idempotency_key(session, idempotency_key)
            if existing is None:
                raise
            return _replay(existing, fingerprint, token_id)


MAX_DATASETS = 100


def _check_datasets(datasets: Sequence[str] | None) -> list[str] | None:
    """The named datasets, sorted and unique; None (every dataset) when not given."""
    if datasets is None:
        return None
    names = sorted(set(datasets))
    if not names:
        raise InvalidRequest("name at least one dataset, or leave datasets out to cover every dataset", "datasets")
    if len(names) > MAX_DATASETS:
        raise InvalidRequest(f"name at most {MAX_DATASETS} datasets", "datasets")
    for name in names:
        if not isinstance(name, str) or not 1 <= len(name) <= 200 or not name[0].isalnum() \
                or not all(c.isalnum() or c in "_.-" for c in name) or not name.isascii():
            raise InvalidRequest("a dataset name is 1-200 ASCII letters, digits, '_', '.' or '-', starting with a "
                                 "letter or digit", "datasets")
    return names


def _check_datasets_exist(session: Session, names: list[str]) -> None:
    from db.models import Dataset

    known = set(session.scalars(select(Dataset.name).where(Dataset.name.in_(names))))
    missing = [name for name in names if name not in known]
    if missing:
        raise InvalidRequest(f"no dataset named {', '.join(repr(n) for n in missing)}; name ingested datasets "
                             "(or leave datasets out to cover every dataset)", "datasets")


def _by_idempotency_key(session: Session, idempotency_key: str) -> ErasureRequest | None:
    return session.scalars(
        select(ErasureRequest).where(ErasureRequest.idempotency_key == idempotency_key)
    ).one_or_none()


def _replay(existing: ErasureRequest, fingerprint: str, token_id: int | None) -> Submission:
    if existing.submitted_by_token_id != token_id:
        raise IdempotencyConflict("this Idempotency-Key was used before by another client; use a new key (e.g. a UUID)")
    if not hmac.compare_digest(existing.body_fingerprint, fingerprint):
        raise IdempotencyConflict(
            "this Idempotency-Key was used before with a different body; "
            "use a new key for a new request, or resend exactly the first body"
        )
    return Submission(existing.id, existing.received_at, existing.original_due_at, replayed=True)


# ---------------------------------------------------------------- reading


def get_request(session: Session, request_id: str, *, for_update: bool = False) -> ErasureRequest:
    """The request, row-locked on PostgreSQL when ``for_update``."""
    query = select(ErasureRequest).where(ErasureRequest.id == str(request_id))
    if for_update:
        query = query.with_for_update().execution_options(populate_existing=True)
    request = session.scalars(query).one_or_none()
    if request is None:
        raise RequestNotFound(f"no erasure request with id {request_id}")
    return request


def describe_request(session: Session, request_id: str, now: datetime | None = None, *,
                     token_id: int | None = None) -> RequestStatus:
    """The request's status; with ``token_id`` only a request that token submitted
    (any other is RequestNotFound, as if it did not exist)."""
    request = get_request(session, request_id)
    if token_id is not None and request.submitted_by_token_id != token_id:
        raise RequestNotFound(f"no erasure request with id {request_id}")
    return _status(request, now or utcnow())


def _latest_note(request: ErasureRequest, kind: NoteKind) -> str | None:
    texts = [n.text for n in request.notes if n.kind == kind]
    return texts[-1] if texts else None


def _status(request: ErasureRequest, now: datetime) -> RequestStatus:
    notes = {n.id: n.text for n in request.notes}
    return RequestStatus(
        id=request.id,
        state=request.state,
        received_at=request.received_at,
        original_due_at=request.original_due_at,
        due_at=request.due_at,
        overdue=request.state not in CLOSED_STATES and request.due_at < now,
        extension_months=request.extension_months,
        extension_reason=_latest_note(request, NoteKind.EXTENSION_REASON),
        denial_ground=request.denial_ground,
        denial_detail=_latest_note(request, NoteKind.DENIAL_DETAIL),
        submitted_by=request.submitted_by,
        identifier_kinds=dict(sorted(Counter(i.kind for i in request.identifiers).items())),
        sample_count=request.sample_count,
        samples_purged_at=request.samples_purged_at,
        closed_at=request.closed_at,
        notes_purged_at=request.notes_purged_at,
        review_decisions=tuple(
            ReviewDecisionView(d.match_ref, d.decision, d.reviewer, notes.get(d.note_id), d.decided_at)
            for d in request.review_decisions
        ),
        history=tuple(
            EventView(e.at, e.actor, e.action, e.from_state, e.to_state, e.reason) for e in request.events
        ),
    )


def identifier_hashes(session: Session, request_id: str) -> list[tuple[str, str]]:
    """(kind, keyed hash) of every identifier of the request, for locating."""
    return [(i.kind, i.keyed_hash) for i in get_request(session, request_id).identifiers]


def sample_texts(session: Session, request_id: str) -> list[str]:
    """The request's samples, in order; empty once purged."""
    return [s.text for s in get_request(session, request_id).samples]


def overdue_requests(session: Session, now: datetime | None = None) -> list[ErasureRequest]:
    """Open requests whose deadline has passed, earliest deadline first."""
    now = now or utcnow()
    return list(session.scalars(
        select(ErasureRequest)
        .where(ErasureRequest.state.in_(sorted(OPEN_STATES)), ErasureRequest.due_at < now)
        .order_by(ErasureRequest.due_at, ErasureRequest.id)
    ))


def requests_due_within(session: Session, window: timedelta, now: datetime | None = None) -> list[ErasureRequest]:
    """Open requests not yet overdue whose deadline falls within ``window``."""
    now = now or utcnow()
    return list(session.scalars(
        select(ErasureRequest)
        .where(
            ErasureRequest.state.in_(sorted(OPEN_STATES)),
            ErasureRequest.due_at >= now,
            ErasureRequest.due_at < now + window,
        )
        .order_by(ErasureRequest.due_at, ErasureRequest.id)
    ))


# ---------------------------------------------------------------- state changes


def _check_actor(actor: str, field: str) -> str:
    """Who acts is a principal (token:NAME, cli:USER, flow:STEP), never a sentence or a typed name."""
    if not isinstance(actor, str) or not ACTOR.fullmatch(actor):
        raise InvalidRequest("an actor is a principal such as token:NAME or cli:USER: up to 200 letters, digits "
                             "and _.:@/+- without spaces", field)
    return actor


def _add_note(session: Session, request: ErasureRequest, kind: NoteKind, text: str, key: bytes | None,
              now: datetime) -> tuple[RequestNote, dict]:
    """Store a person's text as a note; the reference (id, kind, keyed hash) the audit event keeps."""
    if not key:
        raise ValueError("text a person typed is kept as a request note whose keyed hash goes to the audit log: "
                         "pass key= (the service's secret key)")
    note = RequestNote(request_id=request.id, kind=kind.value, text=text, created_at=now)
    session.add(note)
    session.flush()
    return note, {"id": note.id, "kind": kind.value, "hmac": note_hmac(key, text)}


def _record(
    request: ErasureRequest, action: str, from_state: str | None, to_state: str, actor: str, now: datetime,
    reason: str | None = None, details: dict | None = None,
) -> None:
    """A line of the request's timeline (``reason``: a sentence made of codes and counts)
    and the same change on the audit log (``details``: fields of ``request.<action>``)."""
    request.events.append(
        RequestEvent(at=now, actor=actor, action=action, from_state=from_state, to_state=str(to_state), reason=reason)
    )
    request.updated_at = now
    session = object_session(request)
    if session is not None:  # a new request is logged by ``submit_request`` once it is in the session
        _audit(session, request, action, from_state, to_state, actor, now, details or {})


def _audit(session: Session, request: ErasureRequest, action: str, from_state: str | None, to_state: str,
           actor: str, now: datetime, details: dict) -> None:
    """The same change on the hash-chained audit log: states, codes, counts and note references."""
    append_event(session, f"request.{action}", {"from_state": None if from_state is None else str(from_state),
                                                 "to_state": str(to_state), **details},
                 actor=actor, request_id=request.id, at=now)


def _check_move(request: ErasureRequest, to_state: RequestState) -> RequestState:
    """The current state, if ``ALLOWED_TRANSITIONS`` permits the move (else IllegalTransition)."""
    current = RequestState(request.state)
    allowed = ALLOWED_TRANSITIONS[current]
    if to_state not in allowed:
        options = ", ".join(allowed) or "none: the request is closed"
        raise IllegalTransition(
            f"request {request.id} cannot go from {current} to {to_state} (allowed from {current}: {options})"
        )
    return current


def _move(request: ErasureRequest, to_state: RequestState, actor: str, action: str, reason: str | None, now: datetime,
          details: dict) -> None:
    current = _check_move(request, to_state)
    request.state = to_state.value
    _record(request, action, current, to_state, actor, now, reason, details)
    if to_state in CLOSED_STATES:
        request.closed_at = now
        _purge(request, actor, now)


def _clean_reason(reason: str | None, field: str, what: str) -> str:
    text = (reason or "").strip()
    if not text:
        raise InvalidRequest(f"{what} needs a reason; say why in a sentence", field)
    if len(text) > MAX_REASON_CHARS:
        raise InvalidRequest(f"a reason is at most {MAX_REASON_CHARS} characters", field)
    return text


def _sentence(code: TransitionCode, counts: dict[str, int], note: RequestNote | None) -> str | None:
    """The timeline's reason: the code and counts, pointing at a note (never its text)."""
    if code is TransitionCode.UNSPECIFIED and not counts and note is None:
        return None
    text = code.value.replace("_", " ")
    if counts:
        text += " (" + ", ".join(f"{name.replace('_', ' ')} {n}" for name, n in sorted(counts.items())) + ")"
    if note is not None:
        text += f"; reason in note {note.id}"
    return text


def transition(
    session: Session,
    request_id: str,
    to_state: RequestState | str,
    *,
    actor: str,
    reason: str | None = None,
    code: TransitionCode | str | None = None,
    counts: dict[str, int] | None = None,
    key: bytes | None = None,
    now: datetime | None = None,
) -> ErasureRequest:
    """Move a request to ``to_state`` if ``ALLOWED_TRANSITIONS`` permits it; the
    change is recorded in its timeline and on the audit log as ``code`` and
    ``counts``. ``reason`` is a person's text: it becomes a request note (``key``
    needed for its keyed hash) and the code ``operator``. A move to failed or
    back to received needs a reason or a code. Denial goes through ``deny_request``."""
    try:
        target = RequestState(to_state)
    except ValueError:
        raise InvalidRequest(
            f"unknown state {to_state!r}; states: {', '.join(RequestState)}", "state"
        ) from None
    if target is RequestState.DENIED:
        raise InvalidRequest("a denial needs an Art. 17(3) ground: use deny_request", "state")
    try:
        code = TransitionCode(code) if code is not None else (
            TransitionCode.OPERATOR if reason is not None else TransitionCode.UNSPECIFIED)
    except ValueError:
        raise InvalidRequest(f"unknown transition code {code!r}; codes: {', '.join(TransitionCode)}", "code") from None
    if reason is not None or (target in _REASON_REQUIRED
                              and code in (TransitionCode.UNSPECIFIED, TransitionCode.OPERATOR)):
        reason = _clean_reason(reason, "reason", f"a move to {target}")
    _check_actor(actor, "actor")
    counts = dict(counts or {})
    moment = now or utcnow()
    request = get_request(session, request_id, for_update=True)
    _check_move(request, target)  # before a note is written
    details: dict = {"code": code.value, "counts": counts}
    note = None
    if reason is not None:
        note, ref = _add_note(session, request, NoteKind.TRANSITION_REASON, reason, key, moment)
        details["notes"] = [ref]
    _move(request, target, actor, "transition", _sentence(code, counts, note), moment, details)
    session.flush()
    return request


def extend_deadline(
    session: Session,
    request_id: str,
    *,
    months: int,
    reason: str | None,
    actor: str,
    key: bytes | None = None,
    now: datetime | None = None,
) -> RequestStatus:
    """Extend the deadline by ``months`` (Art. 12(3)): a reason is required, the
    total extension is at most two months, and it must be decided within the
    first month and before the request closes. The reason is a request note
    (``key``: the service's secret, for its keyed hash on the audit log)."""
    now = now or utcnow()
    reason = _clean_reason(reason, "reason", "an extension")
    _check_actor(actor, "actor")
    if isinstance(months, bool) or not isinstance(months, int) or not 1 <= months <= MAX_EXTENSION_MONTHS:
        raise InvalidRequest(f"months must be 1 or {MAX_EXTENSION_MONTHS}", "months")
    request = get_request(session, request_id, for_update=True)
    if request.state in CLOSED_STATES:
        raise RequestConflict(f"request {request.id} is {request.state}; a closed request cannot be extended")
    total = request.extension_months + months
    if total > MAX_EXTENSION_MONTHS:
        raise RequestConflict(
            f"request {request.id} is already extended by {request.extension_months} month(s); "
            f"Art. 12(3) allows at most {MAX_EXTENSION_MONTHS} further months in total"
        )
    if now > request.original_due_at:
        raise RequestConflict(
            f"the first month of request {request.id} ended at {request.original_due_at.isoformat()}; "
            "Art. 12(3) requires an extension to be decided and told to the data subject within it"
        )
    note, ref = _add_note(session, request, NoteKind.EXTENSION_REASON, reason, key, now)
    request.extension_months = total
    request.due_at = due_date(request.received_at, total)
    _record(request, "extended", request.state, request.state, actor, now,
            f"+{months} month(s), due {request.due_at.isoformat()}; reason in note {note.id}",
            {"months": months, "extension_months": total, "due_at": request.due_at.isoformat(), "notes": [ref]})
    session.flush()
    return _status(request, now)


def deny_request(
    session: Session,
    request_id: str,
    *,
    ground: DenialGround | str,
    detail: str | None,
    actor: str,
    key: bytes | None = None,
    now: datetime | None = None,
) -> RequestStatus:
    """Refuse the erasure under an Art. 17(3) ground, with the reasoning (a request
    note; ``key``: the service's secret, for its keyed hash on the audit log)."""
    now = now or utcnow()
    try:
        ground = DenialGround(ground)
    except ValueError:
        raise InvalidRequest(
            f"unknown Art. 17(3) ground {ground!r}; grounds: {', '.join(DenialGround)}", "ground"
        ) from None
    detail = _clean_reason(detail, "detail", "a denial")
    _check_actor(actor, "actor")
    request = get_request(session, request_id, for_update=True)
    _check_move(request, RequestState.DENIED)  # before a note is written
    note, ref = _add_note(session, request, NoteKind.DENIAL_DETAIL, detail, key, now)
    _move(request, RequestState.DENIED, actor, "denied", f"Art. 17(3) {ground}; reasoning in note {note.id}", now,
          {"ground": ground.value, "notes": [ref]})
    request.denial_ground = ground.value
    session.flush()
    return _status(request, now)


def record_review_decisions(
    session: Session,
    request_id: str,
    decisions: Sequence[ReviewInput],
    *,
    reviewer: str,
    key: bytes | None = None,
    now: datetime | None = None,
) -> RequestStatus:
    """Record decisions (erase/keep) on matches named by ``match_ref``; a new
    decision on the same match replaces the earlier one (the timeline keeps both).
    ``reviewer`` is the verified principal (token:NAME, cli:USER). The match
    references (they embed record ids) and any reviewer's note are request notes;
    the audit log counts the decisions and keeps the notes' keyed hashes (``key``)."""
    now = now or utcnow()
    if not decisions:
        raise InvalidRequest("give at least one decision", "decisions")
    _check_actor(reviewer, "reviewer")
    for index, item in enumerate(decisions):
        if not item.match_ref or not item.match_ref.strip() or len(item.match_ref) > 200:
            raise InvalidRequest("a match reference is 1 to 200 characters", f"decisions.{index}.match_ref")
        if item.decision not in set(ReviewVerdict):
            raise InvalidRequest("a decision is 'erase' or 'keep'", f"decisions.{index}.decision")
        if item.note is not None and len(item.note) > MAX_REASON_CHARS:
            raise InvalidRequest(f"a note is at most {MAX_REASON_CHARS} characters", f"decisions.{index}.note")
    request = get_request(session, request_id, for_update=True)
    if request.state not in REVIEWABLE_STATES:
        raise RequestConflict(
            f"request {request.id} is {request.state}; review decisions are taken while it is "
            + " or ".join(sorted(REVIEWABLE_STATES))
        )
    refs_note, refs_ref = _add_note(session, request, NoteKind.REVIEW_REFS,
                                    json.dumps([[item.match_ref, item.decision] for item in decisions],
                                               ensure_ascii=False), key, now)
    note_refs = [refs_ref]
    note_ids: dict[str, int] = {}
    for text in dict.fromkeys(item.note.strip() for item in decisions if item.note and item.note.strip()):
        note, ref = _add_note(session, request, NoteKind.REVIEW_NOTE, text, key, now)
        note_ids[text] = note.id
        note_refs.append(ref)
    existing = {d.match_ref: d for d in request.review_decisions}
    for item in decisions:
        note_id = note_ids.get(item.note.strip()) if item.note and item.note.strip() else None
        row = existing.get(item.match_ref)
        if row is None:
            row = ReviewDecision(match_ref=item.match_ref, decision=item.decision, reviewer=reviewer,
                                 note_id=note_id, decided_at=now)
            request.review_decisions.append(row)
            existing[item.match_ref] = row
        else:
            row.decision, row.reviewer, row.note_id, row.decided_at = item.decision, reviewer, note_id, now
    counts = Counter(item.decision for item in decisions)
    summary = ", ".join(f"{counts[v]} {v}" for v in ReviewVerdict if counts[v])
    _record(request, "review", request.state, request.state, reviewer, now,
            f"{summary}; match references in note {refs_note.id}",
            {"erase": counts[ReviewVerdict.ERASE], "keep": counts[ReviewVerdict.KEEP], "notes": note_refs[:1000]})
    session.flush()
    return _status(request, now)


# ---------------------------------------------------------------- review tickets
#
# A paused flow run can be resumed by anyone who can reach Prefect, with any input.
# Decisions given with a resume are applied only with a ticket that the API issued
# to a reviewer it authenticated (POST .../review-tickets): an HMAC, under the
# service's secret, of the request, the reviewer, the exact decisions and note,
# and an expiry. Resuming without decisions re-reads those recorded through the API.

REVIEW_TICKET_TTL = timedelta(hours=24)
_TICKET_PREFIX = "rt1"


class ReviewTicketError(RequestError):
    """A resume's decisions without a valid ticket; ``problem`` is a code for the audit log."""

    def __init__(self, message: str, problem: str) -> None:
        super().__init__(message)
        self.problem = problem


def _decisions_digest(decisions: Sequence[tuple[str, str]], note: str | None) -> str:
    canonical = json.dumps({"decisions": sorted([str(r), str(d)] for r, d in decisions), "note": note or None},
                           ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _ticket_mac(key: bytes, payload: bytes) -> str:
    return hmac.new(key, b"erasure-review-ticket:" + payload, hashlib.sha256).hexdigest()


def issue_review_ticket(key: bytes, request_id: str, reviewer: str, decisions: Sequence[tuple[str, str]],
                        note: str | None = None, *, now: datetime | None = None,
                        ttl: timedelta = REVIEW_TICKET_TTL) -> tuple[str, datetime]:
    """A ticket for resuming the paused review of ``request_id`` with exactly these
    (match_ref, decision) pairs and note, on behalf of ``reviewer``; and its expiry."""
    _check_actor(reviewer, "reviewer")
    if not decisions:
        raise InvalidRequest("give at least one decision", "decisions")
    for index, (_, decision) in enumerate(decisions):
        if decision not in set(ReviewVerdict):
            raise InvalidRequest("a decision is 'erase' or 'keep'", f"decisions.{index}.decision")
    expires = (now or utcnow()) + ttl
    payload = json.dumps({"request_id": str(request_id), "reviewer": reviewer,
                          "decisions_sha256": _decisions_digest(decisions, note),
                          "expires_at": expires.isoformat()}, separators=(",", ":"), sort_keys=True).encode()
    body = base64.urlsafe_b64encode(payload).decode("ascii").rstrip("=")
    return f"{_TICKET_PREFIX}.{body}.{_ticket_mac(key, payload)}", expires


def verify_review_ticket(key: bytes, ticket: str | None, request_id: str, decisions: Sequence[tuple[str, str]],
                         note: str | None = None, *, now: datetime | None = None) -> str:
    """The reviewer a valid ticket names; ReviewTicketError when it is missing, forged,
    expired, for another request, or for other decisions."""
    if not ticket:
        raise ReviewTicketError("decisions given with a resume need a review ticket from the API "
                                "(POST /v1/erasure-requests/{id}/review-tickets)", "missing_ticket")
    try:
        prefix, body, mac = ticket.split(".")
        payload = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        if prefix != _TICKET_PREFIX:
            raise ValueError(prefix)
    except ValueError:
        raise ReviewTicketError("the review ticket is malformed", "malformed") from None
    if not hmac.compare_digest(_ticket_mac(key, payload), mac):
        raise ReviewTicketError("the review ticket was not issued by this service", "bad_signature")
    claims = json.loads(payload)
    if claims["request_id"] != str(request_id):
        raise ReviewTicketError("the review ticket is for another request", "other_request")
    if datetime.fromisoformat(claims["expires_at"]) < (now or utcnow()):
        raise ReviewTicketError("the review ticket has expired; ask the API for another", "expired")
    if not hmac.compare_digest(claims["decisions_sha256"], _decisions_digest(decisions, note)):
        raise ReviewTicketError("the decisions differ from those the review ticket was issued for",
                                "decisions_differ")
    return claims["reviewer"]


def review_verdicts(session: Session, request_id: str) -> dict[str, str]:
    """match_ref -> 'erase' | 'keep', for the flows."""
    return {d.match_ref: d.decision for d in get_request(session, request_id).review_decisions}


def _purge(request: ErasureRequest, actor: str, now: datetime) -> int:
    if request.samples_purged_at is not None:
        return 0
    count = len(request.samples)
    request.samples.clear()  # delete-orphan: the rows are deleted at flush
    request.samples_purged_at = now
    _record(request, "samples_purged", request.state, request.state, actor, now, f"{count} sample(s) deleted",
            {"samples": count})
    return count


def purge_samples(session: Session, request_id: str, *, actor: str = "system", now: datetime | None = None) -> int:
    """Delete the request's content samples (done on closing); returns how many."""
    request = get_request(session, request_id, for_update=True)
    count = _purge(request, actor, now or utcnow())
    session.flush()
    return count


# ---------------------------------------------------------------- notes


@dataclass(frozen=True)
class NotesPurge:
    """What ``purge_notes`` deleted: per request, how many notes."""

    older_than_days: float
    requests: tuple[dict, ...]  # {"request_id", "notes", "by_kind"}

    @property
    def notes(self) -> int:
        return sum(r["notes"] for r in self.requests)

    def to_dict(self) -> dict:
        return {"older_than_days": self.older_than_days, "requests_purged": len(self.requests),
                "notes_deleted": self.notes, "requests": list(self.requests)}


def purge_notes(
    session: Session,
    *,
    older_than: timedelta = DEFAULT_NOTES_RETENTION,
    actor: str = "system",
    now: datetime | None = None,
) -> NotesPurge:
    """Delete the notes of every request closed at least ``older_than`` ago (its
    retention period ended); an open or failed request keeps them. Each purge
    is logged (counts by kind); the audit chain is untouched and still verifies,
    its events keep only the notes' ids and keyed hashes. Idempotent."""
    if older_than < timedelta(0):
        raise InvalidRequest("--older-than is a duration of 0 or more", "older_than")
    _check_actor(actor, "actor")
    now = now or utcnow()
    closed = [state.value for state in CLOSED_STATES]
    due = list(session.scalars(
        select(ErasureRequest)
        .where(ErasureRequest.state.in_(closed), ErasureRequest.closed_at <= now - older_than,
               ErasureRequest.id.in_(select(RequestNote.request_id)))
        .order_by(ErasureRequest.closed_at, ErasureRequest.id)
        .with_for_update()
    ))
    purged = []
    for request in due:
        by_kind = dict(sorted(Counter(n.kind for n in request.notes).items()))
        count = len(request.notes)
        for decision in request.review_decisions:
            decision.note_id = None
        request.notes.clear()  # delete-orphan: the rows are deleted at flush
        request.notes_purged_at = now
        session.flush()
        append_event(session, "request.notes_purged", {"notes_deleted": count, "by_kind": by_kind}, actor=actor,
                     request_id=request.id, at=now)
        purged.append({"request_id": request.id, "notes": count, "by_kind": by_kind})
    return NotesPurge(older_than.total_seconds() / 86400, tuple(purged))


def purge_expired_notes(engine: Engine, *, older_than: timedelta = DEFAULT_NOTES_RETENTION,
                        actor: str = "flow:purge-notes") -> NotesPurge:
    """``purge_notes`` in its own transaction: for the scheduled flows."""
    with unit_of_work(engine) as session:
        return purge_notes(session, older_than=older_than, actor=actor)
