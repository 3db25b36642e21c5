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


class DueReportOut(_Out):
    now: datetime
    within_days: int
    overdue: list[DueRequestOut]
    due_soon: list[DueRequestOut]


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
