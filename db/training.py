"""Training lineage and erasure bookkeeping: checkpoints, ensemble versions and
their members, the matches of each request, and the per-shard retraining jobs.

- ``checkpoints``: one row per stored sub-model checkpoint (content-addressed by
  ``key``; see ``shards.checkpoints``), with the shard version and slice it was
  first trained for and how many records it had seen.
- ``ensemble_versions`` / ``ensemble_members``: an ensemble manifest (which
  checkpoint serves each shard), its parent and what created it. The newest
  version of a dataset (highest ``id``) is the one in service.
- ``request_matches``: every record a request's locate step found, how (method,
  metric, score, hop), the policy decision and the final decision after review,
  and the shard version that no longer holds it once erased.
- ``shard_retrain_jobs``: the pending removals of one shard, batched: erasures
  attach their matches to the shard's ``pending`` job; a retraining claims it
  (``running``, with the shard version it trains on) and marks it ``done``, with
  the runtime it ran in and whether it matched the recorded one.

The schema is created only by Alembic (``migrations/versions/0003_...``).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from db.models import Base, utcnow
from db.models import UTCDateTime

JOB_PENDING = "pending"
JOB_RUNNING = "running"
JOB_DONE = "done"
JOB_STATUSES = (JOB_PENDING, JOB_RUNNING, JOB_DONE)


class Checkpoint(Base):
    """A sub-model checkpoint after ``slice`` of ``shard``; ``shard_version`` is
    the version it was first trained for (a prefix checkpoint also serves later
    versions that left its slices unchanged)."""

    __tablename__ = "checkpoints"
    # audit: "which checkpoints ever held this record" (migration 0004)
    __table_args__ = (Index("ix_checkpoints_dataset_shard_version", "dataset_id", "shard", "shard_version"),)

    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="RESTRICT"), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    shard: Mapped[int] = mapped_column(Integer)
    slice: Mapped[int] = mapped_column(Integer)
    shard_version: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(4096))
    sha256: Mapped[str] = mapped_column(String(64))
    records_seen: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # set when the file was deleted because the sub-model had seen erased records (migration 0004)
    file_purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class EnsembleVersionRow(Base):
    """One ensemble manifest of a dataset; ``version_id`` is its content hash."""

    __tablename__ = "ensemble_versions"
    __table_args__ = (UniqueConstraint("dataset_id", "version_id", name="uq_ensemble_versions_dataset_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="RESTRICT"))
    version_id: Mapped[str] = mapped_column(String(64))
    parent_version_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    manifest_path: Mapped[str] = mapped_column(String(4096))
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class EnsembleMemberRow(Base):
    """Shard ``shard``'s sub-model in an ensemble version: the final checkpoint."""

    __tablename__ = "ensemble_members"
    __table_args__ = (
        ForeignKeyConstraint(
            ["dataset_id", "checkpoint_key"], ["checkpoints.dataset_id", "checkpoints.key"],
            ondelete="RESTRICT", name="fk_ensemble_members_checkpoint",
        ),
        Index("ix_ensemble_members_dataset_checkpoint", "dataset_id", "checkpoint_key"),  # migration 0004
    )

    ensemble_id: Mapped[int] = mapped_column(ForeignKey("ensemble_versions.id", ondelete="CASCADE"), primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(Integer)
    checkpoint_key: Mapped[str] = mapped_column(String(64))


class ShardRetrainJob(Base):
    """The batched pending removals of one shard and their retraining."""

    __tablename__ = "shard_retrain_jobs"
    __table_args__ = (
        Index("ix_shard_retrain_jobs_status_due_at", "status", "due_at"),
        # audit: "which requests does this ensemble version reflect" (migration 0005)
        Index("ix_shard_retrain_jobs_dataset_ensemble_version", "dataset_id", "ensemble_version_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="RESTRICT"))
    shard: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    # the earliest deadline of the requests it serves: retraining goes earliest first
    due_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # the shard version the retraining trains on (set when it is claimed)
    target_shard_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ensemble_version_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    restored_slice: Mapped[int | None] = mapped_column(Integer, nullable=True)
    samples_processed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    full_training_samples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    wall_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    device: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # What the retraining did and in which runtime (migration 0009): the certificate states
    # exactness per shard only from these. ``runtime``/``recorded_runtime``: canonical JSON of
    # ``shards.device.Runtime`` (this run's; the one recorded in the checkpoints it restored).
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)
    runtime: Mapped[str | None] = mapped_column(Text, nullable=True)
    recorded_runtime: Mapped[str | None] = mapped_column(Text, nullable=True)
    runtime_matches: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    config_matches: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class RequestMatch(Base):
    """A record found for a request. ``decision`` is the policy's (erase, review,
    keep); ``final_decision`` is what is done (erase or keep), after review for
    borderline matches. ``match_ref`` is how reviewers name it."""

    __tablename__ = "request_matches"
    __table_args__ = (
        UniqueConstraint("request_id", "dataset_id", "shard", "record_id", name="uq_request_matches_request_record"),
        Index("ix_request_matches_dataset_record", "dataset_id", "record_id"),
        # audit: "whose erased records does this ensemble version still hold" (migration 0005)
        Index("ix_request_matches_dataset_shard_erased", "dataset_id", "shard", "erased_in_shard_version"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("erasure_requests.id", ondelete="RESTRICT"), index=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="RESTRICT"))
    match_ref: Mapped[str] = mapped_column(String(200))
    shard: Mapped[int] = mapped_column(Integer)
    shard_version: Mapped[int] = mapped_column(Integer)
    slice: Mapped[int] = mapped_column(Integer)
    record_id: Mapped[str] = mapped_column(String(256))
    method: Mapped[str] = mapped_column(String(32))
    metric: Mapped[str] = mapped_column(String(32))
    score: Mapped[float] = mapped_column(Float)
    decision: Mapped[str] = mapped_column(String(16))
    hop: Mapped[int] = mapped_column(Integer)
    query: Mapped[str] = mapped_column(String(300))
    # seed / second-hop / sample (dedup.policy.Provenance; migration 0007): a match reached only
    # from a requester's sample goes to review by default.
    provenance: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # An embedding match's paraphrase evidence (migration 0016): canonical JSON of its numbers and
    # reason codes (dedup.paraphrase.ParaphraseEvidence.numbers), never text; NULL for other matches.
    paraphrase_evidence: Mapped[str | None] = mapped_column(Text, nullable=True)
    final_decision: Mapped[str | None] = mapped_column(String(16), nullable=True)
    erased_in_shard_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    retrain_job_id: Mapped[int | None] = mapped_column(
        ForeignKey("shard_retrain_jobs.id", ondelete="RESTRICT"), nullable=True, index=True
    )
    found_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class LabelName(Base):
    """A dataset's class name and the index it is trained as (migration 0011)."""

    __tablename__ = "label_vocabulary"
    __table_args__ = (UniqueConstraint("dataset_id", "name", name="uq_label_vocabulary_dataset_name"),)

    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="RESTRICT"), primary_key=True)
    label_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class BaselineModel(Base):
    """A monolithic model trained for comparison (``erasure train --baseline``), never an ensemble
    member. ``shard_versions`` (JSON ``{shard: version}``) are what it saw: an erasure from one of
    them deletes its file and sets ``file_purged_at`` (``pipeline.erasure.purge_shard_files``)."""

    __tablename__ = "baseline_models"
    __table_args__ = (Index("ix_baseline_models_dataset", "dataset_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="RESTRICT"))
    checkpoint_key: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(4096))
    sha256: Mapped[str] = mapped_column(String(64))
    records_seen: Mapped[int] = mapped_column(Integer)
    config_digest: Mapped[str] = mapped_column(String(64))
    shard_versions: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    file_purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
