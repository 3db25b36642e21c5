"""Erasure requests, their history, review decisions and API tokens.

What is stored, and what is not:
- ``request_identifiers`` holds only the kind and HMAC-SHA256 keyed hash of each
  normalised identifier (as ``record_identifiers`` does); never a raw value.
- ``request_samples`` is the only table that holds content a data subject sent;
  its rows are deleted when the request closes (completed or denied).
- ``request_events`` is the request's timeline: every state change, extension,
  denial, review and purge, with time, actor and a reason made of codes and
  counts (never text a person typed).
- ``request_notes`` holds every text a person typed about a request (extension
  reasons, denial details, reviewer notes, operator reasons, the match
  references a review named). It is mutable: ``purge_notes`` deletes a closed
  request's notes once its retention period ends. The hash-chained audit log
  keeps only each note's id and keyed hash (migration 0007).
- ``api_tokens`` stores the SHA-256 of each bearer token, never the token;
  a request records the id of the token that submitted it.

Times are timezone-aware UTC everywhere (``UTCDateTime``), on SQLite as well.
The schema is created only by Alembic (``migrations/versions/0002_...``).
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    insert,
    select,
    text,
)
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship

from db.models import Base, UTCDateTime, utcnow


class ErasureRequest(Base):
    """One Art. 17 request. ``due_at`` is the current deadline (received + one
    calendar month, + ``extension_months``); ``original_due_at`` never changes."""

    __tablename__ = "erasure_requests"
    __table_args__ = (
        Index("ix_erasure_requests_state_due_at", "state", "due_at"),
        # the console's requests table pages through all states by deadline (migration 0013)
        Index("ix_erasure_requests_due_at_id", "due_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    # HMAC of the normalised submission: tells a replay from a conflicting reuse
    # of the key without keeping the content.
    body_fingerprint: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(32))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    original_due_at: Mapped[datetime] = mapped_column(UTCDateTime())
    due_at: Mapped[datetime] = mapped_column(UTCDateTime())
    extension_months: Mapped[int] = mapped_column(Integer, default=0)
    denial_ground: Mapped[str | None] = mapped_column(String(32), nullable=True)
    submitted_by: Mapped[str] = mapped_column(String(200))
    # The API token that submitted it (None from the CLI): an intake token sees only its own requests.
    submitted_by_token_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # How matches reached only from a requester's sample were decided (dedup.policy.SampleOnly), once located.
    sample_only_policy: Mapped[str | None] = mapped_column(String(16), nullable=True)
    notes_purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    identifier_count: Mapped[int] = mapped_column(Integer)
    sample_count: Mapped[int] = mapped_column(Integer)
    samples_purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # the dataset names the request covers, as a JSON list; NULL: every dataset (migration 0009)
    datasets: Mapped[str | None] = mapped_column(Text, nullable=True)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    identifiers: Mapped[list[RequestIdentifier]] = relationship(
        back_populates="request", order_by="RequestIdentifier.id", cascade="all, delete-orphan"
    )
    samples: Mapped[list[RequestSample]] = relationship(
        back_populates="request", order_by="RequestSample.position", cascade="all, delete-orphan"
    )
    events: Mapped[list[RequestEvent]] = relationship(back_populates="request", order_by="RequestEvent.id")
    review_decisions: Mapped[list[ReviewDecision]] = relationship(
        back_populates="request", order_by="ReviewDecision.match_ref"
    )
    notes: Mapped[list[RequestNote]] = relationship(
        back_populates="request", order_by="RequestNote.id", cascade="all, delete-orphan"
    )


class RequestIdentifier(Base):
    """A keyed hash of one normalised identifier named in a request."""

    __tablename__ = "request_identifiers"
    __table_args__ = (
        UniqueConstraint("request_id", "kind", "keyed_hash", name="uq_request_identifiers_request_kind_hash"),
        Index("ix_request_identifiers_lookup", "kind", "keyed_hash"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("erasure_requests.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    keyed_hash: Mapped[str] = mapped_column(String(64))

    request: Mapped[ErasureRequest] = relationship(back_populates="identifiers")


class RequestSample(Base):
    """A content sample sent with a request; deleted when the request closes."""

    __tablename__ = "request_samples"
    __table_args__ = (UniqueConstraint("request_id", "position", name="uq_request_samples_request_position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("erasure_requests.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)

    request: Mapped[ErasureRequest] = relationship(back_populates="samples")


class RequestEvent(Base):
    """One line of a request's timeline. ``action`` is what happened
    (submitted, transition, extended, denied, review, samples_purged);
    ``from_state``/``to_state`` are equal when the state did not change."""

    __tablename__ = "request_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("erasure_requests.id", ondelete="RESTRICT"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(32))
    from_state: Mapped[str | None] = mapped_column(String(32), nullable=True)
    to_state: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)

    request: Mapped[ErasureRequest] = relationship(back_populates="events")


class ReviewDecision(Base):
    """A reviewer's decision on one match of a request (erase or keep); the
    locate step names matches by ``match_ref``. A later decision replaces it.
    ``reviewer`` is the verified principal (``token:<name>``, ``cli:<user>``);
    a note the reviewer wrote is a ``RequestNote`` (``note_id``)."""

    __tablename__ = "review_decisions"
    __table_args__ = (UniqueConstraint("request_id", "match_ref", name="uq_review_decisions_request_match_ref"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("erasure_requests.id", ondelete="RESTRICT"))
    match_ref: Mapped[str] = mapped_column(String(200))
    decision: Mapped[str] = mapped_column(String(16))
    reviewer: Mapped[str] = mapped_column(String(200))
    note_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    decided_at: Mapped[datetime] = mapped_column(UTCDateTime())

    request: Mapped[ErasureRequest] = relationship(back_populates="review_decisions")


class NoteKind(StrEnum):
    """What a ``RequestNote`` holds."""

    EXTENSION_REASON = "extension_reason"  # why the deadline was extended (Art. 12(3))
    DENIAL_DETAIL = "denial_detail"  # the reasoning of an Art. 17(3) denial
    REVIEW_NOTE = "review_note"  # what a reviewer wrote with decisions
    REVIEW_REFS = "review_refs"  # the match references a review named (they embed record ids)
    TRANSITION_REASON = "transition_reason"  # an operator's reason for a state change
    LEGACY = "legacy"  # text moved out of the tables by migration 0007


class RequestNote(Base):
    """Text a person typed about a request: mutable, kept apart from the
    append-only audit log (which holds only ``id`` and the note's keyed hash),
    deleted by ``purge_notes`` when the request's retention period ends."""

    __tablename__ = "request_notes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("erasure_requests.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    request: Mapped[ErasureRequest] = relationship(back_populates="notes")


# ------------------------------------------------------------------ API tokens

TOKEN_SCOPES = ("intake", "review", "audit", "screen", "admin", "generate")
TOKEN_PREFIX = "er_"


class ApiToken(Base):
    """A bearer token of the API: its SHA-256 and scopes (space-separated)."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    @property
    def scope_set(self) -> frozenset[str]:
        return frozenset(self.scopes.split())

    def allows(self, scope: str) -> bool:
        """admin implies every scope."""
        return scope in self.scope_set or "admin" in self.scope_set


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(session: Session, name: str, scopes: list[str] | tuple[str, ...]) -> tuple[str, ApiToken]:
    """Create a token; returns the plaintext (shown once) and its row."""
    name = name.strip()
    if not name or len(name) > 100:
        raise ValueError("a token needs a name of 1 to 100 characters, e.g. --name intake-portal")
    unknown = sorted(set(scopes) - set(TOKEN_SCOPES))
    if unknown or not scopes:
        problem = f"unknown scope(s): {', '.join(unknown)}" if unknown else "give at least one scope"
        raise ValueError(f"{problem} (known scopes: {', '.join(TOKEN_SCOPES)})")
    if session.scalars(select(ApiToken).where(ApiToken.name == name)).one_or_none() is not None:
        raise ValueError(f"a token named {name!r} exists; revoke it or choose another name")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(name=name, token_sha256=token_digest(token), scopes=" ".join(sorted(set(scopes))), created_at=utcnow())
    session.add(row)
    session.flush()
    from db.audit import append_event  # db.audit imports db.models, which imports this module

    append_event(session, "token.created", {"token_id": row.id, "scopes": sorted(row.scope_set)}, actor="admin")
    return token, row


def find_active_token(session: Session, token: str) -> ApiToken | None:
    """The unrevoked token row for a presented bearer token, or None."""
    row = session.scalars(select(ApiToken).where(ApiToken.token_sha256 == token_digest(token))).one_or_none()
    if row is None or row.revoked_at is not None:
        return None
    return row


def revoke_token(session: Session, name: str) -> ApiToken:
    row = session.scalars(select(ApiToken).where(ApiToken.name == name)).one_or_none()
    if row is None:
        raise LookupError(f"no token named {name!r}; `erasure token list` shows them")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        from db.audit import append_event

        append_event(session, "token.revoked", {"token_id": row.id}, actor="admin")
    return row


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.name)))


# ---------------------------------------------------------------- intake, in one round trip

# A new request, its identifier hashes, samples, first timeline line and audit event in one
# statement (data-modifying CTEs; the foreign keys are checked when the statement ends).
# Intake is hot: the ORM's unit of work cost five round trips and most of a request's CPU.
_INSERT_REQUEST_ON_POSTGRES = text("""
WITH new_request AS (
    INSERT INTO erasure_requests (id, idempotency_key, body_fingerprint, state, received_at, original_due_at, due_at,
                                  extension_months, submitted_by, submitted_by_token_id, identifier_count,
                                  sample_count, datasets, updated_at)
    VALUES (:id, :idempotency_key, :body_fingerprint, :state, :received_at, :original_due_at, :due_at,
            :extension_months, :submitted_by, :submitted_by_token_id, :identifier_count, :sample_count,
            :datasets, :updated_at)
    RETURNING id
), new_identifiers AS (
    INSERT INTO request_identifiers (request_id, kind, keyed_hash)
    SELECT new_request.id, x.kind, x.keyed_hash
    FROM new_request, unnest(CAST(:identifier_kinds AS varchar[]), CAST(:identifier_hashes AS varchar[]))
        AS x(kind, keyed_hash)
), new_samples AS (
    INSERT INTO request_samples (request_id, position, text)
    SELECT new_request.id, x.position - 1, x.text
    FROM new_request, unnest(CAST(:samples AS text[])) WITH ORDINALITY AS x(text, position)
), new_event AS (
    INSERT INTO request_events (request_id, at, actor, action, from_state, to_state, reason)
    SELECT new_request.id, :event_at, :event_actor, :event_action, :event_from_state, :event_to_state, :event_reason
    FROM new_request
)
SELECT event_id FROM audit_append(:audit_at, :audit_actor, :audit_request_id, :audit_kind, :audit_details,
                                  :audit_body)
""")


def insert_request(engine: Engine, request: dict, identifiers: list[tuple[str, str]], samples: list[str],
                   timeline: dict, audit_event: dict) -> None:
    """Insert and commit a new request (``request``: its ``erasure_requests`` columns)
    with its identifier hashes (kind, keyed hash), samples, first timeline line
    (``timeline``: ``request_events`` columns) and audit event (``db.audit.prepare_event``'s
    parameters), as Core statements. A reused idempotency key raises IntegrityError.

    On PostgreSQL one statement in autocommit: the server commits it at once, so the
    audit chain's lock (taken inside it, held to commit) is never held across a round
    trip to this process. Elsewhere one transaction of a few statements."""
    from db.audit import append_prepared  # db.audit imports db.models, which imports this module
    from db.session import unit_of_work

    if engine.dialect.name == "postgresql":
        params = {**request, "identifier_kinds": [kind for kind, _ in identifiers],
                  "identifier_hashes": [digest for _, digest in identifiers], "samples": list(samples),
                  **{f"event_{k}": v for k, v in timeline.items()}, **{f"audit_{k}": v for k, v in audit_event.items()}}
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(_INSERT_REQUEST_ON_POSTGRES, params)
        return
    request_id = request["id"]
    with unit_of_work(engine) as session:
        session.execute(insert(ErasureRequest), [request])
        if identifiers:
            session.execute(insert(RequestIdentifier), [{"request_id": request_id, "kind": kind, "keyed_hash": digest}
                                                        for kind, digest in identifiers])
        if samples:
            session.execute(insert(RequestSample), [{"request_id": request_id, "position": i, "text": sample}
                                                    for i, sample in enumerate(samples)])
        session.execute(insert(RequestEvent), [{"request_id": request_id, **timeline}])
        append_prepared(session, audit_event)
