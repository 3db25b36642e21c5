"""the membership probe per dataset (issue 10, point 7)

- ``membership_probes.dataset_id``: the dataset whose sub-models the probe measured;
  a request erasing from several datasets gets a ``before``/``after`` pair for each.
  Uniqueness becomes (request, dataset, role).
- Existing rows: filled from the request's matches when they lie in exactly one
  dataset; otherwise left NULL, which readers take as the request's first dataset
  (by name, among those it erased from: the one the earlier code probed).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-10
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("membership_probes") as batch:
        batch.add_column(sa.Column("dataset_id", sa.Integer, nullable=True))
        batch.create_foreign_key(op.f("fk_membership_probes_dataset_id_datasets"), "datasets",
                                 ["dataset_id"], ["id"], ondelete="RESTRICT")
        batch.drop_constraint("uq_membership_probes_request_role", type_="unique")
        batch.create_unique_constraint("uq_membership_probes_request_dataset_role",
                                       ["request_id", "dataset_id", "role"])
    op.execute(
        "UPDATE membership_probes SET dataset_id = ("
        " SELECT MIN(m.dataset_id) FROM request_matches m WHERE m.request_id = membership_probes.request_id)"
        " WHERE dataset_id IS NULL AND ("
        " SELECT COUNT(DISTINCT m.dataset_id) FROM request_matches m"
        " WHERE m.request_id = membership_probes.request_id) = 1")


def downgrade() -> None:
    # One pair per request before 0012: keep each request's earliest pair (its first dataset's).
    op.execute(
        "DELETE FROM membership_probes WHERE EXISTS ("
        " SELECT 1 FROM membership_probes AS earlier WHERE earlier.request_id = membership_probes.request_id"
        " AND earlier.role = membership_probes.role AND earlier.id < membership_probes.id)")
    with op.batch_alter_table("membership_probes") as batch:
        batch.drop_constraint("uq_membership_probes_request_dataset_role", type_="unique")
        batch.create_unique_constraint("uq_membership_probes_request_role", ["request_id", "role"])
        batch.drop_constraint(op.f("fk_membership_probes_dataset_id_datasets"), type_="foreignkey")
        batch.drop_column("dataset_id")
