"""mutable request notes apart from the audit log (issue 10, point 2 and 6)

- ``request_notes``: every text a person typed about a request (extension
  reasons, denial details, reviewer notes, operator reasons, reviewed match
  references), deletable when the request's retention period ends; the audit
  log keeps only each note's id and keyed hash. The free-text columns
  ``erasure_requests.extension_reason`` / ``denial_detail`` and
  ``review_decisions.note`` move there (as ``legacy`` notes) and are dropped.
- ``erasure_requests.submitted_by_token_id``: an intake token sees only its own
  requests; ``sample_only_policy``: how sample-only matches were decided;
  ``notes_purged_at``.
- ``request_matches.provenance``: seed, second-hop or sample.

SQLite (>= 3.35) drops a plain column in place, so ``erasure_requests``, which
other tables reference, is never rebuilt.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def _utc() -> sa.DateTime:
    # as in 0002: the plain type that db.models.UTCDateTime stores through
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "request_notes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.ForeignKeyConstraint(["request_id"], ["erasure_requests.id"],
                                name=op.f("fk_request_notes_request_id_erasure_requests"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_request_notes")),
    )
    op.create_index(op.f("ix_request_notes_request_id"), "request_notes", ["request_id"])
    op.add_column("erasure_requests", sa.Column("submitted_by_token_id", sa.Integer(), nullable=True))
    op.add_column("erasure_requests", sa.Column("sample_only_policy", sa.String(length=16), nullable=True))
    op.add_column("erasure_requests", sa.Column("notes_purged_at", _utc(), nullable=True))
    op.add_column("review_decisions", sa.Column("note_id", sa.Integer(), nullable=True))
    op.add_column("request_matches", sa.Column("provenance", sa.String(length=16), nullable=True))

    # Existing free text becomes notes (purgeable like any other), then its columns go.
    bind = op.get_bind()
    now = datetime.now(timezone.utc)
    notes = sa.table("request_notes", sa.column("request_id", sa.String), sa.column("kind", sa.String),
                     sa.column("text", sa.Text), sa.column("created_at", _utc()))
    rows = []
    for request_id, extension, denial in bind.execute(sa.text(
            "SELECT id, extension_reason, denial_detail FROM erasure_requests "
            "WHERE extension_reason IS NOT NULL OR denial_detail IS NOT NULL")):
        rows += [{"request_id": request_id, "kind": "legacy", "text": text, "created_at": now}
                 for text in (extension, denial) if text]
    for request_id, note in bind.execute(sa.text(
            "SELECT request_id, note FROM review_decisions WHERE note IS NOT NULL")):
        rows.append({"request_id": request_id, "kind": "legacy", "text": note, "created_at": now})
    if rows:
        op.bulk_insert(notes, rows)
    op.drop_column("erasure_requests", "extension_reason")
    op.drop_column("erasure_requests", "denial_detail")
    op.drop_column("review_decisions", "note")


def downgrade() -> None:
    """Lossy for the notes: their texts are not put back into the dropped columns."""
    op.add_column("review_decisions", sa.Column("note", sa.Text(), nullable=True))
    op.add_column("erasure_requests", sa.Column("denial_detail", sa.Text(), nullable=True))
    op.add_column("erasure_requests", sa.Column("extension_reason", sa.Text(), nullable=True))
    op.drop_column("request_matches", "provenance")
    op.drop_column("review_decisions", "note_id")
    op.drop_column("erasure_requests", "notes_purged_at")
    op.drop_column("erasure_requests", "sample_only_policy")
    op.drop_column("erasure_requests", "submitted_by_token_id")
    op.drop_index(op.f("ix_request_notes_request_id"), table_name="request_notes")
    op.drop_table("request_notes")
