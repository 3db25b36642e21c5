"""Bodies of the /v1/audit routes (pydantic v2), apart from the tables and from
the query results in ``db.audit_queries`` (read from their attributes).

Every answer is ids, counts, states and times; identifiers go in a POST body
(never a URL: URLs are logged) and are kept only long enough to be hashed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from api.schemas import IdentifierIn
from pipeline.lifecycle import MAX_IDENTIFIERS, hash_identifiers

DatasetName = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
MAX_WITHIN_DAYS = 366


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# ---------------------------------------------------------------- subject (the one input body)


class SubjectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    identifiers: list[IdentifierIn] = Field(
        min_length=1, max_length=MAX_IDENTIFIERS,
        description="The subject's identifiers; hashed with the server's key exactly as at ingest and intake, "
        "never stored or returned.",
    )
    dataset: DatasetName | None = Field(default=None, description="Only this dataset (default: all).")

    def keyed_hashes(self, key: bytes) -> list[tuple[str, str]]:
        """(kind, keyed hash) pairs, computed as intake computes them."""
        return hash_identifiers(key, [(item.kind, item.value) for item in self.identifiers])


# ---------------------------------------------------------------- timeline


class TimelineEntryOut(_Out):
    at: datetime
    actor: str
    kind: str = Field(description="What happened, in the audit log's names (request.transition, shard.erased, ...).")
    from_state: str | None
    to_state: str | None
    reason: str | None
    source: str = Field(description="audit_log, request_events, or both (one event written to the two tables).")
    audit_event_id: int | None
    request_event_id: int | None
    details: dict[str, Any] = Field(description="The audit event's ids and counts.")
    notes: list[dict[str, Any]] = Field(
        default_factory=list, description="Texts a person typed with the event ({id, kind, hmac, text}), from the "
        "request's notes; text is null once they are purged (the audit log keeps only the keyed hash).")


class RequestTimelineOut(_Out):
    request_id: str
    state: str
    received_at: datetime
    original_due_at: datetime
    due_at: datetime
    closed_at: datetime | None
    overdue: bool
    audit_log_events: int
    state_history_events: int
    entries: list[TimelineEntryOut]


# ---------------------------------------------------------------- deadlines


class DueRequestOut(_Out):
    request_id: str
    state: str
    received_at: datetime
    due_at: datetime
    extension_months: int
    days_left: float = Field(description="Days until the deadline; negative when overdue.")


class UpstreamActionOut(_Out):
    request_id: str
    source_file_id: int
    path: str
    sha256: str
    rows: list[int]
    done_at: datetime | None
    done_by: str | None


class DueReportOut(_Out):
    now: datetime
    within_days: int
    overdue: list[DueRequestOut]
    due_soon: list[DueRequestOut]
    upstream_open: list[UpstreamActionOut] = Field(
        default_factory=list, description="Ingested source files that still hold an erased subject's rows upstream "
                                          "(path, sha256, row numbers), until an operator marks them done.")


# ---------------------------------------------------------------- subject lineage


class MatchRefOut(_Out):
    request_id: str
    method: str
    decision: str
    final_decision: str | None
    erased_in_shard_version: int | None


class CheckpointRefOut(_Out):
    key: str
    slice: int
    shard_version: int
    created_at: datetime


class EnsembleRefOut(_Out):
    version_id: str
    created_by: str
    created_at: datetime


class SubjectRecordOut(_Out):
    dataset: str
    record_id: str
    shard: int
    slice: int
    first_shard_version: int
    erased_in_shard_version: int | None
    found_by: list[str]
    matches: list[MatchRefOut]
    shard_versions: list[int]
    checkpoints: list[CheckpointRefOut]
    ensemble_versions: list[EnsembleRefOut]
    current_shard_version: int | None
    in_current_shard_version: bool
    current_ensemble_version: str | None
    in_current_ensemble: bool


class SubjectLineageOut(_Out):
    identifiers: int
    requests: list[str]
    records: list[SubjectRecordOut]
    erased: int
    in_current_shard_versions: int
    in_current_ensembles: int
    ensemble_versions: list[str]


# ---------------------------------------------------------------- ensemble


class ReflectedRequestOut(_Out):
    request_id: str
    state: str
    retrain_jobs: list[int]
    produced: list[str]
    erased_records: int
    still_held: int


class HeldRequestOut(_Out):
    request_id: str
    state: str
    erased_records_held: int


class EnsembleReflectionsOut(_Out):
    dataset: str
    version_id: str
    parent_version_id: str | None
    created_by: str
    created_at: datetime
    is_current: bool
    lineage: list[str]
    reflected: list[ReflectedRequestOut]
    still_holding: list[HeldRequestOut]


# ---------------------------------------------------------------- screen references


class ScreenReferenceOut(_Out):
    reference: str = Field(description="The opaque reference a /v1/screen answer gave.")
    dataset: str
    request_id: str = Field(description="The erasure request whose tombstone matched.")
    shard: int | None = Field(description="The shard the erased record was in.")
    record_id: str | None = Field(description="The erased record's id.")


# ---------------------------------------------------------------- residue check


class ResidueSummaryOut(_Out):
    orphans: int
    shard_hits: int
    shard_hits_unresolved: int
    database_hits: int
    prefect: str = Field(description="clean, hits, or not_checked (never clean when Prefect could not be read)")
    upstream_open: int


class ResidueReportOut(_Out):
    """``pipeline.residue.check_residue``: hits by place, as counts and ids (no text)."""

    request_id: str
    state: str
    clean: bool
    complete: bool = Field(description="false when Prefect's records were not checked")
    summary: ResidueSummaryOut
    inventory: dict[str, Any]
    shards: dict[str, Any]
    database: dict[str, Any]
    prefect: dict[str, Any]
    upstream: list[UpstreamActionOut]
    tombstones: dict[str, int]
    seconds: float
