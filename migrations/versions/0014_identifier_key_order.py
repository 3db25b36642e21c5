"""identifier key order: ``record_identifiers``' primary key leads with the keyed hash, which
PostgreSQL compares bytewise (COLLATE "C")

Why: the key was (kind, keyed_hash, dataset_id, record_id). Building or extending it compares
``kind`` first, one of three values, so every comparison went on to the 64-character hash under
the database's linguistic collation. With the hash first and collated bytewise, PostgreSQL sorts
by 8-byte abbreviated keys that almost always decide alone: building the key over a million
identifier rows (what a large ingest does, see ``db.lineage.lineage_bulk_load``) takes about half
the time. Lookups are unchanged: every query names (kind, keyed_hash), an equality on the
leading column. The hashes are lower-case hex, so bytewise and linguistic order agree anyway.
SQLite compares bytewise already (BINARY); only the column order changes there.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def _rekey(columns: list[str], collation: str | None) -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint("pk_record_identifiers", "record_identifiers", type_="primary")
        op.alter_column("record_identifiers", "keyed_hash", existing_type=sa.String(64), existing_nullable=False,
                        type_=sa.String(64, collation=collation))
        op.create_primary_key("pk_record_identifiers", "record_identifiers", columns)
        return
    with op.batch_alter_table("record_identifiers", recreate="always") as batch:
        batch.drop_constraint("pk_record_identifiers", type_="primary")
        batch.create_primary_key("pk_record_identifiers", columns)


def upgrade() -> None:
    _rekey(["keyed_hash", "kind", "dataset_id", "record_id"], "C")


def downgrade() -> None:
    _rekey(["kind", "keyed_hash", "dataset_id", "record_id"], None)
