"""Accountability tables: the hash-chained audit log, signed certificates and
membership-inference probe results.

The audit log is append-only and tamper-evident. Event ``n`` stores

    hash_n = SHA-256( hash_{n-1} || n || LF || canonical_json(at, actor, request_id, kind, details) )

with ``hash_0`` = 64 zeros, so changing, deleting or reordering any event breaks
every later link; ``verify_chain`` recomputes it and names the first broken
event. On PostgreSQL (and SQLite) a trigger rejects UPDATE and DELETE on the
table (migration 0004); a superuser who bypasses it still cannot hide the edit
from ``erasure audit verify-log``.

Appends are serialised so the chain is a line, not a tree: on PostgreSQL by a
transaction-scoped advisory lock inside the ``audit_append`` function (one round
trip), on SQLite by its single writer. The event id
is assigned before hashing (last id + 1) and is the primary key, so two racing
appends can never both link to the same predecessor. Append events as the last
writes of a transaction: the lock is held until commit.

``details`` must hold ids, counts, hashes and thresholds only: never a raw
identifier or a sample text (the log outlives the request's samples).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, select, text
from sqlalchemy.orm import Mapped, Session, mapped_column

from db.models import Base, UTCDateTime, utcnow

GENESIS_HASH = "0" * 64
# pg_advisory_xact_lock key of the audit chain ("audit" in ASCII, an arbitrary constant)
AUDIT_LOCK_KEY = 0x6175646974


class AuditEvent(Base):
    """One event of the append-only, hash-chained audit log."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_request_id", "request_id"),
        Index("ix_audit_events_kind_at", "kind", "at"),
    )

    # assigned by ``append_event`` (last + 1), not by a sequence: the id is hashed
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(200))
    request_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    kind: Mapped[str] = mapped_column(String(48))
    details: Mapped[str] = mapped_column(Text)  # canonical JSON
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class Certificate(Base):
    """The signed erasure certificate of a completed request (one per request).
    ``document`` is the signed envelope exactly as issued (canonical JSON)."""

    __tablename__ = "certificates"

    request_id: Mapped[str] = mapped_column(ForeignKey("erasure_requests.id", ondelete="RESTRICT"), primary_key=True)
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    document: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str] = mapped_column(String(64))


class MembershipProbe(Base):
    """A membership-inference check of one ensemble version for a request:
    ``role`` is ``before`` (the ensemble in service before erasure) or ``after``
    (the retrained one). AUC 0.5 means the erased records look like records the
    model never saw."""

    __tablename__ = "membership_probes"
    __table_args__ = (UniqueConstraint("request_id", "role", name="uq_membership_probes_request_role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("erasure_requests.id", ondelete="RESTRICT"))
    role: Mapped[str] = mapped_column(String(16))
    ensemble_version_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    metric: Mapped[str] = mapped_column(String(32))
    auc: Mapped[float | None] = mapped_column(Float, nullable=True)
    ci_low: Mapped[float | None] = mapped_column(Float, nullable=True)
    ci_high: Mapped[float | None] = mapped_column(Float, nullable=True)
    erased_count: Mapped[int] = mapped_column(Integer)
    heldout_count: Mapped[int] = mapped_column(Integer)
    details: Mapped[str] = mapped_column(Text)  # canonical JSON: counts, quantiles, method; no content
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


# ------------------------------------------------------------------ the chain


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 kept: the same value always gives the same text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def event_body(at: datetime, actor: str, request_id: str | None, kind: str, details: str) -> str:
    """What an event's hash covers besides its id and predecessor (canonical JSON)."""
    return canonical_json({"at": at.isoformat(timespec="microseconds"), "actor": actor, "request_id": request_id,
                           "kind": kind, "details": details})


def event_hash(prev_hash: str, event_id: int, body: str) -> str:
    """SHA-256(prev_hash || id || LF || body), hex. PostgreSQL's ``audit_append``
    (migration 0004) computes the same bytes."""
    return hashlib.sha256(f"{prev_hash}{event_id}\n{body}".encode("utf-8")).hexdigest()


def chain_head(session: Session) -> tuple[int, str]:
    """(id, hash) of the last event, read under the chain's append lock (held to
    commit on PostgreSQL), so an event appended next in this transaction links to it."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": AUDIT_LOCK_KEY})
    session.flush()  # earlier events of this transaction first
    last = session.execute(select(AuditEvent.id, AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1)).first()
    return (last.id, last.hash) if last else (0, GENESIS_HASH)


_APPEND_ON_POSTGRES = text(
    "SELECT event_id, event_hash FROM audit_append(:at, :actor, :request_id, :kind, :details, :body)")


def append_event(
    session: Session,
    kind: str,
    details: dict[str, Any] | None = None,
    *,
    actor: str,
    request_id: str | None = None,
    at: datetime | None = None,
) -> int:
    """Append one event to the chain inside the caller's transaction; its id.

    On PostgreSQL one call of ``audit_append`` takes the lock, reads the head and
    inserts (one round trip: the lock is held until commit, so every round trip
    inside it costs every concurrent writer). Elsewhere the same steps in Python."""
    if not kind or len(kind) > 48:
        raise ValueError("an audit event kind is 1-48 characters")
    # In UTC, as it reads back; microseconds survive both backends: the hash recomputes.
    moment = (at or utcnow()).astimezone(timezone.utc)
    actor = actor[:200]
    details_json = canonical_json(details or {})
    body = event_body(moment, actor, request_id, kind, details_json)
    if session.get_bind().dialect.name == "postgresql":
        session.flush()  # earlier events of this transaction first
        row = session.execute(_APPEND_ON_POSTGRES, {"at": moment, "actor": actor, "request_id": request_id,
                                                    "kind": kind, "details": details_json, "body": body}).one()
        return int(row.event_id)
    last_id, prev = chain_head(session)
    event_id = last_id + 1
    session.add(AuditEvent(id=event_id, at=moment, actor=actor, request_id=request_id, kind=kind,
                           details=details_json, prev_hash=prev, hash=event_hash(prev, event_id, body)))
    session.flush()
    return event_id


@dataclass(frozen=True)
class ChainVerdict:
    events: int
    ok: bool
    first_broken_id: int | None = None
    problem: str | None = None
    last_hash: str | None = None

    def to_dict(self) -> dict:
        return {"events": self.events, "ok": self.ok, "first_broken_id": self.first_broken_id,
                "problem": self.problem, "last_hash": self.last_hash}


def verify_chain(session: Session, batch: int = 5000) -> ChainVerdict:
    """Recompute every link in id order; stop at the first event that does not
    match (an edited field, a deleted or inserted event, a gap in the ids)."""
    prev, expected_id, count, after = GENESIS_HASH, 1, 0, 0
    while True:
        rows = session.execute(
            select(AuditEvent).where(AuditEvent.id > after).order_by(AuditEvent.id).limit(batch)
        ).scalars().all()
        if not rows:
            return ChainVerdict(count, True, last_hash=prev if count else None)
        for e in rows:
            if e.id != expected_id:
                return ChainVerdict(count, False, e.id, f"event {e.id} follows {expected_id - 1}: "
                                                         f"event(s) {expected_id}..{e.id - 1} are missing")
            if e.prev_hash != prev:
                return ChainVerdict(count, False, e.id, f"event {e.id} does not link to event {e.id - 1} "
                                                         "(its prev_hash differs: an earlier event was changed)")
            recomputed = event_hash(prev, e.id, event_body(e.at, e.actor, e.request_id, e.kind, e.details))
            if recomputed != e.hash:
                return ChainVerdict(count, False, e.id, f"event {e.id} was changed after it was written "
                                                         "(its contents no longer match its hash)")
            prev, expected_id, count = e.hash, e.id + 1, count + 1
        session.expunge_all()
        after = rows[-1].id
