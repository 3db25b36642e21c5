"""shared storage by URL (issue 13, part 1)

- ``datasets.tombstones_url``: with ``ERASURE_STORAGE_URL`` set, the content-addressed
  object holding the dataset's current tombstones (the file in the home is then each
  host's cached copy). NULL on one machine, where the file in the home is the truth.
- ``shard_versions.index_url``: with a storage URL, the object (a tar) holding the
  version's locate indexes; NULL on one machine (they lie beside the file).

Rows that already record paths (``shard_versions.path``, ``checkpoints.path``,
``ensemble_versions.manifest_path``, ``baseline_models.path``) record the object's URL
instead when a storage URL is set: no column changes for them.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("tombstones_url", sa.String(4096), nullable=True))
    with op.batch_alter_table("shard_versions") as batch:
        batch.add_column(sa.Column("index_url", sa.String(4096), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("shard_versions") as batch:
        batch.drop_column("index_url")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("tombstones_url")
