"""runtime and dataset sections of certificates (issue 10, points 5 and 7)

Each shard retraining job records what it did (``outcome``), the runtime it ran
in and the runtime recorded in the checkpoints it restored (canonical JSON of
``shards.device.Runtime``), and whether they and the model config matched: the
certificate states exactness per shard only from these facts. A request may
name the datasets it covers (``erasure_requests.datasets``, a JSON list; NULL:
every dataset).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("shard_retrain_jobs") as batch:
        batch.add_column(sa.Column("outcome", sa.String(16), nullable=True))
        batch.add_column(sa.Column("runtime", sa.Text(), nullable=True))
        batch.add_column(sa.Column("recorded_runtime", sa.Text(), nullable=True))
        batch.add_column(sa.Column("runtime_matches", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("config_matches", sa.Boolean(), nullable=True))
    with op.batch_alter_table("erasure_requests") as batch:
        batch.add_column(sa.Column("datasets", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("erasure_requests") as batch:
        batch.drop_column("datasets")
    with op.batch_alter_table("shard_retrain_jobs") as batch:
        batch.drop_column("config_matches")
        batch.drop_column("runtime_matches")
        batch.drop_column("recorded_runtime")
        batch.drop_column("runtime")
        batch.drop_column("outcome")
