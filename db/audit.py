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

``details`` hold ids, counts, enums, hashes and numbers only, never text a
person typed, a name, a raw identifier or a sample (the log can never be
edited, so what it holds can never be erased). ``EVENT_SCHEMAS`` says, for
every event kind, which fields its details have and of which type; there is
no type for free text. ``append_event`` refuses details that do not pass
(ValueError naming the kind and the field). Human text about a request goes to
``request_notes`` (mutable, purgeable); an event holds the note's id and its
keyed hash (``note_hmac``). A new event kind needs its entry here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

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
    (the retrained one), one pair per dataset the request erased from. AUC 0.5
    means the erased records look like records the model never saw. ``dataset_id``
    is NULL only on rows from before migration 0012 whose request matched in several
    datasets: those measured the request's first dataset (``pipeline.membership``)."""

    __tablename__ = "membership_probes"
    __table_args__ = (UniqueConstraint("request_id", "dataset_id", "role",
                                       name="uq_membership_probes_request_dataset_role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("erasure_requests.id", ondelete="RESTRICT"))
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="RESTRICT"), nullable=True)
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


# ------------------------------------------------------------------ details schemas
#
# A field type is a function value -> problem (None when the value passes). None of
# them admits free text: strings pass only as uuids, hex digests, ISO timestamps,
# members of a closed set, or machine names of a fixed shape (dataset names,
# devices, actors of the flows).

FieldType = Callable[[Any], "str | None"]

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_HEX = re.compile(r"^[0-9a-f]+$")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def INT(value: Any) -> str | None:
    return None if _is_int(value) else "must be an integer"


def FLOAT(value: Any) -> str | None:
    ok = (_is_int(value) or isinstance(value, float))
    return None if ok else "must be a number"


def BOOL(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def UUID(value: Any) -> str | None:
    return None if isinstance(value, str) and _UUID.match(value) else "must be a lowercase UUID"


def HEX(length: int | None = None, max_length: int = 128) -> FieldType:
    """A lowercase hex digest (``length`` digits exactly, else 8 to ``max_length``)."""
    def check(value: Any) -> str | None:
        if not isinstance(value, str) or not _HEX.match(value):
            return "must be a lowercase hex digest"
        if length is not None and len(value) != length:
            return f"must be {length} hex digits"
        if length is None and not 8 <= len(value) <= max_length:
            return f"must be 8 to {max_length} hex digits"
        return None
    return check


HEX64 = HEX(64)


def TIMESTAMP(value: Any) -> str | None:
    if not isinstance(value, str) or len(value) > 40:
        return "must be an ISO 8601 time"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return "must be an ISO 8601 time"
    return None if moment.tzinfo is not None else "must be an ISO 8601 time with its offset"


def ENUM(*values: str) -> FieldType:
    """One of a closed set of strings."""
    allowed = frozenset(values)

    def check(value: Any) -> str | None:
        return None if isinstance(value, str) and value in allowed else f"must be one of {sorted(allowed)}"
    return check


def SHAPED(what: str, pattern: str) -> FieldType:
    """A machine name of a fixed shape (no spaces), e.g. a dataset name."""
    compiled = re.compile(pattern)

    def check(value: Any) -> str | None:
        return None if isinstance(value, str) and compiled.fullmatch(value) else f"must be {what}"
    return check


def NULLABLE(inner: FieldType) -> FieldType:
    def check(value: Any) -> str | None:
        return None if value is None else inner(value)
    return check


def LIST(inner: FieldType, max_items: int = 100_000) -> FieldType:
    def check(value: Any) -> str | None:
        if not isinstance(value, list) or len(value) > max_items:
            return f"must be a list of at most {max_items} items"
        for index, item in enumerate(value):
            problem = inner(item)
            if problem:
                return f"[{index}] {problem}"
        return None
    return check


def MAP(key: FieldType, value: FieldType) -> FieldType:
    """An object whose keys pass ``key`` (as strings) and values pass ``value``."""
    def check(found: Any) -> str | None:
        if not isinstance(found, Mapping):
            return "must be an object"
        for k, v in found.items():
            problem = key(k if isinstance(k, str) else str(k))
            if problem:
                return f"key {str(k)[:40]!r} {problem}"
            problem = value(v)
            if problem:
                return f"[{str(k)[:40]!r}] {problem}"
        return None
    return check


def OBJECT(fields: Mapping[str, FieldType], optional: frozenset[str] = frozenset()) -> FieldType:
    """An object with exactly ``fields`` (those in ``optional`` may be absent)."""
    def check(found: Any) -> str | None:
        if not isinstance(found, Mapping):
            return "must be an object"
        problem = _fields_problem(found, fields, optional)
        return None if problem is None else f"{problem[0]}: {problem[1]}"
    return check


def _fields_problem(found: Mapping, fields: Mapping[str, FieldType],
                    optional: frozenset[str]) -> tuple[str, str] | None:
    for name in found:
        if name not in fields:
            return str(name)[:60], "is not a field of this event kind"
    for name, check in fields.items():
        if name not in found:
            if name in optional:
                continue
            return name, "is missing"
        problem = check(found[name])
        if problem:
            return name, problem
    return None


INT_KEY = SHAPED("a whole number", r"[0-9]{1,9}")
DATASET_NAME = SHAPED("a dataset name", r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
DEVICE = SHAPED("a device (cpu, cuda, cuda:N, mps)", r"cpu|cuda(:[0-9]{1,3})?|mps")
# The request states (pipeline.lifecycle.RequestState; db/ does not import pipeline/,
# a unit test keeps the two equal).
REQUEST_STATES = ("received", "locating", "awaiting_review", "erasing", "awaiting_retrain", "retraining",
                  "verifying", "completed", "denied", "failed")
STATE = ENUM(*REQUEST_STATES)
DENIAL_GROUNDS = ("freedom_of_expression", "legal_obligation", "public_health", "archiving_research", "legal_claims")
NOTE_KINDS = ("extension_reason", "denial_detail", "review_note", "review_refs", "transition_reason", "legacy")
# Why a request changed state (pipeline.lifecycle.TransitionCode, kept equal by a unit test).
TRANSITION_CODES = (
    "unspecified", "operator", "processing_started", "matches_to_review", "matches_decided", "nothing_found",
    "review_complete", "review_timeout_decided", "review_timeout_failed", "records_erased", "retraining_started",
    "retrained_by_another_run", "retrained", "retraining_refused", "manifest_check_failed", "verified_and_purged",
)
# What a transition's counts may count (a closed set: a key is never free text).
COUNT_NAMES = ("erase", "review", "undecided", "decided", "records", "shards", "shard", "job_id",
               "still_in_manifest", "erased_records", "shard_versions_purged", "checkpoints_purged",
               "deferred_shards", "keep")
NOTE_REF = OBJECT({"id": INT, "kind": ENUM(*NOTE_KINDS), "hmac": HEX64})
NOTES = LIST(NOTE_REF, 1001)
_EXTRACTION_NUMBERS = OBJECT({"probed": INT, "skipped_short": INT, "extracted": INT, "exact": INT, "rate": FLOAT,
                              "ci_low": FLOAT, "ci_high": FLOAT})
MATCH_METHODS = ENUM("identifier", "minhash", "embedding", "second-hop")
SAMPLE_ONLY_POLICIES = ("review", "score")

# What the sweep and the residue inventory call a file (pipeline/gc.py): a closed set.
FILE_KINDS = ("shard_version", "purged_shard_version", "unrecorded_shard_version", "shard_temp", "index_temp",
              "locate_index", "orphan_locate_index", "checkpoint", "purged_checkpoint", "unrecorded_checkpoint",
              "unrecorded_checkpoint_with_erased_records", "atomic_temp", "ingest_spill", "superseded_files",
              "tombstones", "ensemble_manifest", "unrecorded_ensemble_manifest", "request_report", "unknown_file",
              "key", "database", "ingested_source_file", "demo_ground_truth", "prefect_home", "writer_marker",
              # objects in the shared store (ERASURE_STORAGE_URL)
              "object", "purged_object", "orphan_object")
FILE_COUNTS = MAP(ENUM(*FILE_KINDS), INT)
RESIDUE_PREFECT = ("clean", "hits", "not_checked")

_STATES = {"from_state": NULLABLE(STATE), "to_state": STATE}
_OPTIONAL_NOTES = frozenset({"notes"})

# kind -> (fields, optional fields). One entry per event kind: a kind that is not here is refused.
EVENT_SCHEMAS: dict[str, tuple[dict[str, FieldType], frozenset[str]]] = {
    # the request lifecycle (pipeline/lifecycle.py)
    "request.submitted": ({**_STATES, "identifiers": INT, "samples": INT, "due_at": TIMESTAMP}, frozenset()),
    "request.transition": ({**_STATES, "code": ENUM(*TRANSITION_CODES), "counts": MAP(ENUM(*COUNT_NAMES), INT),
                            "notes": NOTES}, _OPTIONAL_NOTES),
    "request.extended": ({**_STATES, "months": INT, "extension_months": INT, "due_at": TIMESTAMP, "notes": NOTES},
                         frozenset()),
    "request.denied": ({**_STATES, "ground": ENUM(*DENIAL_GROUNDS), "notes": NOTES}, frozenset()),
    "request.review": ({**_STATES, "erase": INT, "keep": INT, "notes": NOTES}, frozenset()),
    "request.samples_purged": ({**_STATES, "samples": INT}, frozenset()),
    "request.notes_purged": ({"notes_deleted": INT, "by_kind": MAP(ENUM(*NOTE_KINDS), INT)}, frozenset()),
    "review.resume_refused": ({"decisions": INT, "problem": ENUM(
        "missing_ticket", "malformed", "bad_signature", "expired", "other_request", "decisions_differ")}, frozenset()),
    # locate, erase, purge (pipeline/erasure.py)
    "matches.recorded": ({"dataset_id": INT, "erase": INT, "review": INT, "by_method": MAP(MATCH_METHODS, INT),
                          "sample_only": INT, "sample_only_policy": ENUM(*SAMPLE_ONLY_POLICIES)},
                         frozenset({"sample_only", "sample_only_policy"})),
    "shard.erased": ({"dataset": DATASET_NAME, "shard": INT, "from_version": INT, "to_version": INT,
                      "to_sha256": HEX64, "records_erased": INT, "already_erased": INT,
                      "retrain_job_id": NULLABLE(INT)}, frozenset()),
    "files.purged": ({"shard_versions": LIST(OBJECT({"shard": INT, "version": INT})), "checkpoints": LIST(HEX()),
                      "kept_in_service": LIST(HEX()), "deferred_shards": LIST(INT)}, frozenset()),
    # the sweep and the residue check (pipeline/gc.py, residue.py)
    "gc.swept": ({"removed": FILE_COUNTS, "kept_in_flight": FILE_COUNTS, "unknown": INT, "errors": FILE_COUNTS,
                  "purged_superseded": OBJECT({"shard_versions": INT, "checkpoints": INT}),
                  "deferred_shards": INT}, frozenset()),
    "residue.checked": ({"clean": BOOL, "orphans": INT, "shard_hits": INT, "database_hits": INT,
                         "prefect": ENUM(*RESIDUE_PREFECT), "upstream_open": INT}, frozenset()),
    "upstream.done": ({"source_file_id": INT, "source_sha256": HEX64, "rows": INT}, frozenset()),
    # retraining, training, ingest (pipeline/retraining.py, training.py, ingest.py)
    "shard.retrained": ({"dataset": DATASET_NAME, "shard": INT, "job_id": INT,
                         "outcome": ENUM("untrained", "retrain", "up_to_date", "emptied"), "shard_version": INT,
                         "restored_slice": NULLABLE(INT), "samples_processed": NULLABLE(INT),
                         "full_training_samples": NULLABLE(INT), "device": NULLABLE(DEVICE),
                         "ensemble_version": NULLABLE(HEX()), "runtime_matches": NULLABLE(BOOL),
                         "config_matches": NULLABLE(BOOL)}, frozenset({"runtime_matches", "config_matches"})),
    "shard.retrain_refused": ({"dataset": DATASET_NAME, "shard": INT, "job_id": INT,
                               "job_status": ENUM("pending", "running"),
                               "differences": LIST(ENUM("device", "torch_version", "threads", "deterministic"), 4),
                               "recorded_device": SHAPED("a device kind", r"[a-z]{1,16}"),
                               "worker_device": SHAPED("a device kind", r"[a-z]{1,16}")}, frozenset()),
    "shard.retrain_superseded": ({"dataset": DATASET_NAME, "shard": INT, "job_id": INT,
                                  "trained_shard_version": INT, "latest_shard_version": INT}, frozenset()),
    "ensemble.publish_deferred": ({"dataset": DATASET_NAME, "stale_shards": LIST(INT)}, frozenset()),
    "dataset.searched": ({"dataset_id": INT, "erase": INT, "review": INT}, frozenset()),
    "ensemble.published": ({"dataset": DATASET_NAME, "version_id": HEX(), "parent_version_id": NULLABLE(HEX()),
                            "members": MAP(INT_KEY, HEX()),
                            "created_by": SHAPED("train or retrain:job:N", r"train|retrain:job:[0-9]{1,12}")},
                           frozenset()),
    "dataset.ingested": ({"dataset": DATASET_NAME, "source_file_id": INT, "source_sha256": HEX64, "rows": INT,
                          "new_records": INT, "skipped_existing": INT, "screened_out": INT,
                          "tombstones_hit": LIST(UUID),
                          "shard_versions": LIST(OBJECT({"shard": INT, "version": INT, "sha256": HEX64,
                                                         "rows": INT})),
                          # pipeline/placement.py (absent from events before migration 0010)
                          "placement": ENUM("subject", "record"),
                          "placement_report": OBJECT({
                              "subjects": INT, "linked_records": INT, "copies_joined": INT, "joined_existing": INT,
                              "spread_subjects": INT, "bin_capacity": INT,
                              "hubs": LIST(OBJECT({"kind": ENUM("email", "user_id", "name", "phone"),
                                                   "keyed_hash": HEX64, "records": INT}))}),
                          # pipeline/labels.py: class names added to the vocabulary (a count; migration 0011)
                          "labels_added": INT},
                         frozenset({"placement", "placement_report", "labels_added"})),
    "baseline.trained": ({"dataset": DATASET_NAME, "baseline_id": INT, "checkpoint": HEX(), "records_seen": INT,
                          "shard_versions": MAP(INT_KEY, INT)}, frozenset()),  # pipeline/training.py (0011)
    "dataset.rekeyed": ({"dataset": DATASET_NAME, "records_rekeyed": INT, "indexes_rebuilt": INT,
                         "unkeyed_tombstones_dropped": INT}, frozenset()),  # pipeline/rekey.py
    # accountability (pipeline/membership.py, certificate.py)
    "membership.probed": ({"metric": ENUM("cross_entropy_loss", "reference_calibrated_logit"),
                           "dataset": DATASET_NAME,  # absent from events before the probe per dataset
                           "roles": MAP(ENUM("before", "after"), OBJECT({
        "ensemble_version": NULLABLE(HEX()), "auc": NULLABLE(FLOAT), "ci_low": NULLABLE(FLOAT),
        "ci_high": NULLABLE(FLOAT), "erased": INT, "heldout": INT,
        # the reference-calibrated probe adds (absent from events of the older loss probe):
        "groups": INT, "heldout_groups": INT, "members": INT, "power_auc": NULLABLE(FLOAT),
        "power_ci_low": NULLABLE(FLOAT), "power_ci_high": NULLABLE(FLOAT)},
        frozenset({"groups", "heldout_groups", "members", "power_auc", "power_ci_low", "power_ci_high"})))},
                          frozenset({"dataset"})),
    "extraction.probed": ({"dataset": DATASET_NAME,  # pipeline/extraction.py: counts and rates only, no text
                           "settings": OBJECT({"prompt_words": INT, "continuation_words": INT, "span": INT}),
                           "control_records": INT,
                           "roles": MAP(ENUM("before", "after"), OBJECT({
        "ensemble_version": NULLABLE(HEX()),
        "erased": NULLABLE(_EXTRACTION_NUMBERS), "control": NULLABLE(_EXTRACTION_NUMBERS)}))}, frozenset()),
    # front-end suppression (pipeline/generation.py): counts per call, never the prompt or the output
    "generation.screened": ({"dataset": DATASET_NAME, "call": ENUM("generate", "predict"),
                             "refused": MAP(ENUM("erased_identifier", "near_erased_text"), INT), "blocked": INT,
                             "served": INT}, frozenset()),
    "certificate.issued": ({"sha256": HEX64, "key_id": HEX64}, frozenset()),
    # API tokens (db/requests.py)
    "token.created": ({"token_id": INT, "scopes": LIST(ENUM("intake", "review", "audit", "screen", "admin", "generate"), 6)},
                      frozenset()),
    "token.revoked": ({"token_id": INT}, frozenset()),
    # the compliance console's sessions (api/console_auth.py)
    "console.signed_in": ({"token_id": INT, "expires_at": TIMESTAMP}, frozenset()),
    "console.signed_out": ({"token_id": INT}, frozenset()),
}

# Who acts: a principal of a fixed shape ("token:<name>", "cli:<user>", "flow:<step>", "admin"),
# never a sentence.
ACTOR = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@/+-]{0,199}")


def check_details(kind: str, details: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``details`` pass the schema of ``kind`` (naming the kind and field)."""
    schema = EVENT_SCHEMAS.get(kind)
    if schema is None:
        raise ValueError(f"audit event kind {kind!r} has no details schema: add it to db.audit.EVENT_SCHEMAS")
    if not isinstance(details, Mapping):
        raise ValueError(f"audit event {kind!r}: details must be an object")
    fields, optional = schema
    problem = _fields_problem(details, fields, optional)
    if problem is not None:
        raise ValueError(f"audit event {kind!r}: field {problem[0]!r} {problem[1]} "
                         "(the audit log holds ids, counts, enums and hashes only; text goes to request_notes)")


def note_hmac(key: bytes, text: str) -> str:
    """The keyed hash of a note that the audit log keeps in the note's place."""
    return hmac.new(key, b"erasure-request-note:" + text.encode("utf-8"), hashlib.sha256).hexdigest()


_APPEND_ON_POSTGRES = text(
    "SELECT event_id, event_hash FROM audit_append(:at, :actor, :request_id, :kind, :details, :body)")


def prepare_event(kind: str, details: dict[str, Any] | None = None, *, actor: str, request_id: str | None = None,
                  at: datetime | None = None) -> dict[str, Any]:
    """The checked parameters of ``audit_append`` (at, actor, request_id, kind, details, body);
    ValueError when ``details`` fail ``EVENT_SCHEMAS[kind]`` or the actor is not a principal."""
    if not kind or len(kind) > 48:
        raise ValueError("an audit event kind is 1-48 characters")
    check_details(kind, details or {})
    if not isinstance(actor, str) or not ACTOR.fullmatch(actor):
        raise ValueError(f"audit event {kind!r}: the actor must be a principal such as token:NAME or cli:USER "
                         "(up to 200 letters, digits and _.:@/+-), not a sentence")
    # In UTC, as it reads back; microseconds survive both backends: the hash recomputes.
    moment = (at or utcnow()).astimezone(timezone.utc)
    details_json = canonical_json(details or {})
    return {"at": moment, "actor": actor, "request_id": request_id, "kind": kind, "details": details_json,
            "body": event_body(moment, actor, request_id, kind, details_json)}


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
    ``details`` must pass ``EVENT_SCHEMAS[kind]`` (else ValueError, nothing written).

    On PostgreSQL one call of ``audit_append`` takes the lock, reads the head and
    inserts (one round trip: the lock is held until commit, so every round trip
    inside it costs every concurrent writer). Elsewhere the same steps in Python."""
    return append_prepared(session, prepare_event(kind, details, actor=actor, request_id=request_id, at=at))


def append_prepared(session: Session, event: dict[str, Any]) -> int:
    """Append an event from ``prepare_event`` inside the caller's transaction; its id."""
    if session.get_bind().dialect.name == "postgresql":
        session.flush()  # earlier events of this transaction first
        row = session.execute(_APPEND_ON_POSTGRES, event).one()
        return int(row.event_id)
    last_id, prev = chain_head(session)
    event_id = last_id + 1
    session.add(AuditEvent(id=event_id, at=event["at"], actor=event["actor"], request_id=event["request_id"],
                           kind=event["kind"], details=event["details"], prev_hash=prev,
                           hash=event_hash(prev, event_id, event["body"])))
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
