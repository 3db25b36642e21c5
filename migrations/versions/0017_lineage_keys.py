"""lineage keys a bulk ingest rebuilds cheaply (issue 12, item 5)

- ``record_identifiers.keyed_hash`` on PostgreSQL: ``bytea`` (the HMAC-SHA256's 32 bytes) instead
  of 64 hex characters. The table and its primary key shrink by about a third (582k identifier
  rows: table 67 -> 49 MB, key 65 -> 45 MB) and rebuilding the key after a bulk load
  (``db.lineage.lineage_bulk_load``) sorts and writes correspondingly less. Python still sees hex
  (``db.models.HexDigest``); SQLite keeps the hex text. Bytewise order is unchanged: lower-case hex
  sorts as the bytes it spells.
- ``ix_records_dataset_shard_slice`` (every record, by shard and slice) is replaced by the partial
  ``ix_records_erased`` (dataset, shard, erasure) over erased records only. Its users all ask for
  erased records (a purge's "records of this shard erased", the sweep's "shards with erased
  records", the lineage export's "records erased in this version"), which it answers from a few
  entries instead of every record of the shard. A bulk load never adds to it (new records are not
  erased): its rebuild was 0.2 s of a 1.3 s lineage transaction for 200k records. The live
  per-slice counts that placement and retraining estimates read become one scan of the
  dataset's records (tens of milliseconds per 100k records, at ingest and on status views).

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

_ERASED = "erased_in_shard_version IS NOT NULL"
_IDENTIFIER_KEY = ["keyed_hash", "kind", "dataset_id", "record_id"]


def upgrade() -> None:
    op.drop_index("ix_records_dataset_shard_slice", table_name="records")
    op.create_index("ix_records_erased", "records", ["dataset_id", "shard", "erased_in_shard_version"],
                    postgresql_where=sa.text(_ERASED), sqlite_where=sa.text(_ERASED))
    if op.get_bind().dialect.name == "postgresql":
        # decode() refuses anything but hex digits: a bad row fails the migration, which rolls back
        op.drop_constraint("pk_record_identifiers", "record_identifiers", type_="primary")
        op.execute("ALTER TABLE record_identifiers ALTER COLUMN keyed_hash TYPE bytea USING decode(keyed_hash, 'hex')")
        op.create_primary_key("pk_record_identifiers", "record_identifiers", _IDENTIFIER_KEY)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint("pk_record_identifiers", "record_identifiers", type_="primary")
        op.execute('ALTER TABLE record_identifiers ALTER COLUMN keyed_hash TYPE varchar(64) COLLATE "C" '
                   "USING encode(keyed_hash, 'hex')")
        op.create_primary_key("pk_record_identifiers", "record_identifiers", _IDENTIFIER_KEY)
    op.drop_index("ix_records_erased", table_name="records")
    op.create_index("ix_records_dataset_shard_slice", "records", ["dataset_id", "shard", "slice"])
