"""accountability: hash-chained append-only audit log (UPDATE/DELETE rejected by
a trigger), certificates, membership probes; indexes for the audit queries;
when the files of superseded shard versions and checkpoints were purged

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

APPEND_ONLY_MESSAGE = "audit_events is append-only"
AUDIT_LOCK_KEY = 0x6175646974  # = db.audit.AUDIT_LOCK_KEY (a migration does not import the models)


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("at", _utc(), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("request_id", sa.String(length=36), nullable=True),
        sa.Column("kind", sa.String(length=48), nullable=False),
        sa.Column("details", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
        sa.UniqueConstraint("hash", name=op.f("uq_audit_events_hash")),
    )
    op.create_index("ix_audit_events_request_id", "audit_events", ["request_id"], unique=False)
    op.create_index("ix_audit_events_kind_at", "audit_events", ["kind", "at"], unique=False)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"""
            CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION '{APPEND_ONLY_MESSAGE}: % is not allowed', TG_OP
                    USING ERRCODE = 'insufficient_privilege';
            END $$;
        """)
        # One round trip per append: lock, read the head, hash, insert (db/audit.py has the same hash in Python).
        op.execute(f"""
            CREATE FUNCTION audit_append(p_at timestamptz, p_actor varchar, p_request_id varchar, p_kind varchar,
                                         p_details text, p_body text)
            RETURNS TABLE (event_id integer, event_hash varchar) LANGUAGE plpgsql AS $$
            DECLARE
                last_id integer;
                last_hash varchar;
            BEGIN
                PERFORM pg_advisory_xact_lock({AUDIT_LOCK_KEY});
                SELECT e.id, e.hash INTO last_id, last_hash FROM audit_events e ORDER BY e.id DESC LIMIT 1;
                IF NOT FOUND THEN
                    last_id := 0;
                    last_hash := repeat('0', 64);
                END IF;
                event_id := last_id + 1;
                event_hash := encode(sha256(convert_to(last_hash || event_id::text || chr(10) || p_body, 'UTF8')),
                                     'hex');
                INSERT INTO audit_events (id, at, actor, request_id, kind, details, prev_hash, hash)
                VALUES (event_id, p_at, p_actor, p_request_id, p_kind, p_details, last_hash, event_hash);
                RETURN NEXT;
            END $$;
        """)
        op.execute("CREATE TRIGGER audit_events_no_change BEFORE UPDATE OR DELETE ON audit_events "
                   "FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()")
        op.execute("CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events "
                   "FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only()")
    else:
        for verb in ("UPDATE", "DELETE"):
            op.execute(f"CREATE TRIGGER audit_events_no_{verb.lower()} BEFORE {verb} ON audit_events "
                       f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY_MESSAGE}: {verb} is not allowed'); END")

    op.create_table(
        "certificates",
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("issued_at", _utc(), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["request_id"], ["erasure_requests.id"],
                                name=op.f("fk_certificates_request_id_erasure_requests"), ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_certificates")),
    )
    op.create_table(
        "membership_probes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("ensemble_version_id", sa.String(length=64), nullable=True),
        sa.Column("metric", sa.String(length=32), nullable=False),
        sa.Column("auc", sa.Float(), nullable=True),
        sa.Column("ci_low", sa.Float(), nullable=True),
        sa.Column("ci_high", sa.Float(), nullable=True),
        sa.Column("erased_count", sa.Integer(), nullable=False),
        sa.Column("heldout_count", sa.Integer(), nullable=False),
        sa.Column("details", sa.Text(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.ForeignKeyConstraint(["request_id"], ["erasure_requests.id"],
                                name=op.f("fk_membership_probes_request_id_erasure_requests"), ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_membership_probes")),
        sa.UniqueConstraint("request_id", "role", name="uq_membership_probes_request_role"),
    )
    op.add_column("shard_versions", sa.Column("files_purged_at", _utc(), nullable=True))
    op.add_column("checkpoints", sa.Column("file_purged_at", _utc(), nullable=True))
    op.create_index("ix_checkpoints_dataset_shard_version", "checkpoints", ["dataset_id", "shard", "shard_version"])
    op.create_index("ix_ensemble_members_dataset_checkpoint", "ensemble_members", ["dataset_id", "checkpoint_key"])


def downgrade() -> None:
    op.drop_index("ix_ensemble_members_dataset_checkpoint", table_name="ensemble_members")
    op.drop_index("ix_checkpoints_dataset_shard_version", table_name="checkpoints")
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("file_purged_at")
    with op.batch_alter_table("shard_versions") as batch:
        batch.drop_column("files_purged_at")
    op.drop_table("membership_probes")
    op.drop_table("certificates")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_truncate ON audit_events")
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_change ON audit_events")
        op.execute("DROP FUNCTION IF EXISTS audit_events_append_only()")
        op.execute("DROP FUNCTION IF EXISTS audit_append(timestamptz, varchar, varchar, varchar, text, text)")
    op.drop_index("ix_audit_events_kind_at", table_name="audit_events")
    op.drop_index("ix_audit_events_request_id", table_name="audit_events")
    op.drop_table("audit_events")
