"""paraphrase evidence on match rows (issue 16, item 4)

- ``request_matches.paraphrase_evidence``: for an embedding match, canonical JSON of
  what decided it: cosine, ratio margin, rank among the query's neighbours, lead over
  the runner-up, score, both neighbourhood means, shingle Jaccard, longest shared span
  (in words) and the policy's reason codes. Numbers and codes only: the shared spans
  are the subject's words and are recomputed from the texts while they exist. NULL for
  other matches, and for matches recorded before this revision.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("request_matches") as batch:
        batch.add_column(sa.Column("paraphrase_evidence", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("request_matches") as batch:
        batch.drop_column("paraphrase_evidence")
