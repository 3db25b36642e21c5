"""keyed content digests and keyed tombstones (issue 10, point 1)

``records.content_sha256`` (a plain SHA-256 of each record's text: anyone holding a
guessed text could confirm it was, or had been, in the training data) becomes
``records.content_hmac`` = HMAC-SHA256(secret key, "content:" text), nullable.

A migration has no secret key, so it cannot compute the HMACs: every old plain
digest is set to NULL (erased records' and live ones': a live record's plain
digest would become an oracle the moment it is erased). Live records get their
HMAC back from the text in their current shard file at the next ingest of the
dataset, or with ``erasure db rekey`` (which also rewrites the table so that the
old values leave the database files: VACUUM on SQLite, VACUUM FULL on PostgreSQL).
Erased records keep NULL: their text is gone, and a NULL digest only means that a
re-ingest of the same id is skipped without comparing texts.

Downgrade: the column is renamed back and emptied ('' in every row), since neither
the plain digests nor the key are available here; the old code then refuses
re-ingests of existing ids with a different-text error rather than guessing.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("records") as batch:
        batch.alter_column("content_sha256", new_column_name="content_hmac",
                           existing_type=sa.String(length=64), nullable=True)
    op.execute(sa.text("UPDATE records SET content_hmac = NULL"))


def downgrade() -> None:
    op.execute(sa.text("UPDATE records SET content_hmac = ''"))
    with op.batch_alter_table("records") as batch:
        batch.alter_column("content_hmac", new_column_name="content_sha256",
                           existing_type=sa.String(length=64), nullable=False)
