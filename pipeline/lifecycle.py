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
Every change appends to the request's timeline (``request_events``).
"""

from __future__ import annotations

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
from db.audit import append_event
from db.requests import ErasureRequest, RequestEvent, RequestIdentifier, RequestSample, ReviewDecision
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
    extension_reason: str | None
    denial_ground: str | None
    denial_detail: str | None
    submitted_by: str
    identifier_kinds: dict[str, int]
    sample_count: int
    samples_purged_at: datetime | None
    closed_at: datetime | None
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


def _fingerprint(key: bytes, hashed: list[tuple[str, str]], samples: Sequence[str]) -> str:
    """HMAC of the normalised submission: equal for equal content whatever the
    identifiers' order or spelling, and useless without the key."""
    canonical = json.dumps(
        {"identifiers": sorted(f"{k}:{h}" for k, h in hashed), "samples": list(samples)},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hmac.new(key, b"erasure-request-body:" + canonical.encode(), hashlib.sha256).hexdigest()


def submit_request(
    engine: Engine,
    key: bytes,
    *,
    idempotency_key: str,
    identifiers: Sequence[tuple[str, object]],
    samples: Sequence[str],
    actor: str,
    now: datetime | None = None,
) -> Submission:
    """Store a new request, committed when this returns; idempotent by key.

    The same key with the same (normalised) body returns the first request
    (``replayed``); with another body it raises IdempotencyConflict. Two
    concurrent first submissions of one key race on the unique constraint: the
    loser's insert fails and it returns the winner's request.
    """
    check_idempotency_key(idempotency_key)
    hashed = hash_identifiers(key, list(identifiers))
    samples = list(samples)
    _check_samples(samples)
    if not hashed and not samples:
        raise InvalidRequest("give at least one identifier or one sample", "samples")
    fingerprint = _fingerprint(key, hashed, samples)
    try:
        # Insert first: a replay is rare, and the unique key catches it (one round trip fewer).
        with unit_of_work(engine) as session:
            received_at = (now or utcnow()).astimezone(timezone.utc)  # calendar months count in UTC
            request = _new_request(idempotency_key, fingerprint, hashed, samples, actor, received_at)
            session.add(request)
            session.flush()
            _audit(session, request, "submitted", None, RequestState.RECEIVED, actor, received_at,
                   request.events[0].reason)
            return Submission(request.id, request.received_at, request.original_due_at, replayed=False)
    except IntegrityError:
        with unit_of_work(engine) as session:
            existing = _by_idempotency_key(session, idempotency_key)
            if existing is None:
                raise
            return _replay(existing, fingerprint)


def _by_idempotency_key(session: Session, idempotency_key: str) -> ErasureRequest | None:
    return session.scalars(
        select(ErasureRequest).where(ErasureRequest.idempotency_key == idempotency_key)
    ).one_or_none()


def _replay(existing: ErasureRequest, fingerprint: str) -> Submission:
    if not hmac.compare_digest(existing.body_fingerprint, fingerprint):
        raise IdempotencyConflict(
            "this Idempotency-Key was used before with a different body; "
            "use a new key for a new request, or resend exactly the first body"
        )
    return Submission(existing.id, existing.received_at, existing.original_due_at, replayed=True)


def _new_request(
    idempotency_key: str, fingerprint: str, hashed: list[tuple[str, str]], samples: list[str], actor: str, now: datetime
) -> ErasureRequest:
    due = due_date(now)
    request = ErasureRequest(
        id=str(uuid.uuid4()),
        idempotency_key=idempotency_key,
        body_fingerprint=fingerprint,
        state=RequestState.RECEIVED.value,
        received_at=now,
        original_due_at=due,
        due_at=due,
        extension_months=0,
        submitted_by=actor,
        identifier_count=len(hashed),
        sample_count=len(samples),
        updated_at=now,
    )
    request.identifiers = [RequestIdentifier(kind=kind, keyed_hash=digest) for kind, digest in hashed]
    request.samples = [RequestSample(position=i, text=text) for i, text in enumerate(samples)]
    _record(request, "submitted", None, RequestState.RECEIVED, actor, now,
            f"{len(hashed)} identifier(s), {len(samples)} sample(s); due {due.isoformat()}")
    return request


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


def describe_request(session: Session, request_id: str, now: datetime | None = None) -> RequestStatus:
    return _status(get_request(session, request_id), now or utcnow())


def _status(request: ErasureRequest, now: datetime) -> RequestStatus:
    return RequestStatus(
        id=request.id,
        state=request.state,
        received_at=request.received_at,
        original_due_at=request.original_due_at,
        due_at=request.due_at,
        overdue=request.state not in CLOSED_STATES and request.due_at < now,
        extension_months=request.extension_months,
        extension_reason=request.extension_reason,
        denial_ground=request.denial_ground,
        denial_detail=request.denial_detail,
        submitted_by=request.submitted_by,
        identifier_kinds=dict(sorted(Counter(i.kind for i in request.identifiers).items())),
        sample_count=request.sample_count,
        samples_purged_at=request.samples_purged_at,
        closed_at=request.closed_at,
        review_decisions=tuple(
            ReviewDecisionView(d.match_ref, d.decision, d.reviewer, d.note, d.decided_at) for d in request.review_decisions
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


def _record(
    request: ErasureRequest, action: str, from_state: str | None, to_state: str, actor: str, now: datetime,
    reason: str | None = None,
) -> None:
    request.events.append(
        RequestEvent(at=now, actor=actor, action=action, from_state=from_state, to_state=str(to_state), reason=reason)
    )
    request.updated_at = now
    session = object_session(request)
    if session is not None:  # a new request is logged by ``submit_request`` once it is in the session
        _audit(session, request, action, from_state, to_state, actor, now, reason)


def _audit(session: Session, request: ErasureRequest, action: str, from_state: str | None, to_state: str,
           actor: str, now: datetime, reason: str | None) -> None:
    """The same change on the hash-chained audit log (ids, states and the reason only)."""
    append_event(session, f"request.{action}", {"from_state": None if from_state is None else str(from_state),
                                                 "to_state": str(to_state), "reason": reason},
                 actor=actor, request_id=request.id, at=now)


def _move(request: ErasureRequest, to_state: RequestState, actor: str, action: str, reason: str | None, now: datetime) -> None:
    current = RequestState(request.state)
    allowed = ALLOWED_TRANSITIONS[current]
    if to_state not in allowed:
        options = ", ".join(allowed) or "none: the request is closed"
        raise IllegalTransition(
            f"request {request.id} cannot go from {current} to {to_state} (allowed from {current}: {options})"
        )
    request.state = to_state.value
    _record(request, action, current, to_state, actor, now, reason)
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


def transition(
    session: Session,
    request_id: str,
    to_state: RequestState | str,
    *,
    actor: str,
    reason: str | None = None,
    now: datetime | None = None,
) -> ErasureRequest:
    """Move a request to ``to_state`` if ``ALLOWED_TRANSITIONS`` permits it; the
    change is recorded in its timeline. Denial goes through ``deny_request``."""
    try:
        target = RequestState(to_state)
    except ValueError:
        raise InvalidRequest(
            f"unknown state {to_state!r}; states: {', '.join(RequestState)}", "state"
        ) from None
    if target is RequestState.DENIED:
        raise InvalidRequest("a denial needs an Art. 17(3) ground: use deny_request", "state")
    if target in _REASON_REQUIRED:
        reason = _clean_reason(reason, "reason", f"a move to {target}")
    request = get_request(session, request_id, for_update=True)
    _move(request, target, actor, "transition", reason, now or utcnow())
    session.flush()
    return request


def extend_deadline(
    session: Session,
    request_id: str,
    *,
    months: int,
    reason: str | None,
    actor: str,
    now: datetime | None = None,
) -> RequestStatus:
    """Extend the deadline by ``months`` (Art. 12(3)): a reason is required, the
    total extension is at most two months, and it must be decided within the
    first month and before the request closes."""
    now = now or utcnow()
    reason = _clean_reason(reason, "reason", "an extension")
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
    request.extension_months = total
    request.due_at = due_date(request.received_at, total)
    request.extension_reason = reason
    _record(request, "extended", request.state, request.state, actor, now,
            f"+{months} month(s), due {request.due_at.isoformat()}: {reason}")
    session.flush()
    return _status(request, now)


def deny_request(
    session: Session,
    request_id: str,
    *,
    ground: DenialGround | str,
    detail: str | None,
    actor: str,
    now: datetime | None = None,
) -> RequestStatus:
    """Refuse the erasure under an Art. 17(3) ground, with the reasoning."""
    now = now or utcnow()
    try:
        ground = DenialGround(ground)
    except ValueError:
        raise InvalidRequest(
            f"unknown Art. 17(3) ground {ground!r}; grounds: {', '.join(DenialGround)}", "ground"
        ) from None
    detail = _clean_reason(detail, "detail", "a denial")
    request = get_request(session, request_id, for_update=True)
    _move(request, RequestState.DENIED, actor, "denied", f"Art. 17(3) {ground}: {detail}", now)
    request.denial_ground = ground.value
    request.denial_detail = detail
    session.flush()
    return _status(request, now)


def record_review_decisions(
    session: Session,
    request_id: str,
    decisions: Sequence[ReviewInput],
    *,
    reviewer: str,
    now: datetime | None = None,
) -> RequestStatus:
    """Record decisions (erase/keep) on matches named by ``match_ref``; a new
    decision on the same match replaces the earlier one (the timeline keeps both)."""
    now = now or utcnow()
    if not decisions:
        raise InvalidRequest("give at least one decision", "decisions")
    for index, item in enumerate(decisions):
        if not item.match_ref or not item.match_ref.strip() or len(item.match_ref) > 200:
            raise InvalidRequest("a match reference is 1 to 200 characters", f"decisions.{index}.match_ref")
        if item.decision not in set(ReviewVerdict):
            raise InvalidRequest("a decision is 'erase' or 'keep'", f"decisions.{index}.decision")
    request = get_request(session, request_id, for_update=True)
    if request.state not in REVIEWABLE_STATES:
        raise RequestConflict(
            f"request {request.id} is {request.state}; review decisions are taken while it is "
            + " or ".join(sorted(REVIEWABLE_STATES))
        )
    existing = {d.match_ref: d for d in request.review_decisions}
    for item in decisions:
        row = existing.get(item.match_ref)
        if row is None:
            row = ReviewDecision(match_ref=item.match_ref, decision=item.decision, reviewer=reviewer,
                                 note=item.note, decided_at=now)
            request.review_decisions.append(row)
            existing[item.match_ref] = row
        else:
            row.decision, row.reviewer, row.note, row.decided_at = item.decision, reviewer, item.note, now
    counts = Counter(item.decision for item in decisions)
    summary = ", ".join(f"{counts[v]} {v}" for v in ReviewVerdict if counts[v])
    refs = ", ".join(item.match_ref for item in decisions[:20]) + (" ..." if len(decisions) > 20 else "")
    _record(request, "review", request.state, request.state, reviewer, now, f"{summary}: {refs}")
    session.flush()
    return _status(request, now)


def review_verdicts(session: Session, request_id: str) -> dict[str, str]:
    """match_ref -> 'erase' | 'keep', for the flows."""
    return {d.match_ref: d.decision for d in get_request(session, request_id).review_decisions}


def _purge(request: ErasureRequest, actor: str, now: datetime) -> int:
    if request.samples_purged_at is not None:
        return 0
    count = len(request.samples)
    request.samples.clear()  # delete-orphan: the rows are deleted at flush
    request.samples_purged_at = now
    _record(request, "samples_purged", request.state, request.state, actor, now, f"{count} sample(s) deleted")
    return count


def purge_samples(session: Session, request_id: str, *, actor: str = "system", now: datetime | None = None) -> int:
    """Delete the request's content samples (done on closing); returns how many."""
    request = get_request(session, request_id, for_update=True)
    count = _purge(request, actor, now or utcnow())
    session.flush()
    return count

