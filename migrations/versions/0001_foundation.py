"""foundation: datasets, source files, records, identifiers, shard versions

Revision ID: 0001
Revises: 
Create Date: 2026-11-28
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('datasets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('seed', sa.BigInteger(), nullable=False),
    sa.Column('n_shards', sa.Integer(), nullable=False),
    sa.Column('n_slices', sa.Integer(), nullable=False),
    sa.Column('feature_dim', sa.Integer(), nullable=False),
    sa.Column('embedder', sa.String(length=100), nullable=False),
    sa.Column('key_id', sa.String(length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_datasets')),
    sa.UniqueConstraint('name', name=op.f('uq_datasets_name'))
    )
    op.create_table('shard_versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('shard', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('path', sa.String(length=4096), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('row_count', sa.Integer(), nullable=False),
    sa.Column('created_by', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_shard_versions_dataset_id_datasets'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_shard_versions')),
    sa.UniqueConstraint('dataset_id', 'shard', 'version', name='uq_shard_versions_dataset_shard_version')
    )
    op.create_table('source_files',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('path', sa.String(length=4096), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('format', sa.String(length=16), nullable=False),
    sa.Column('row_count', sa.Integer(), nullable=False),
    sa.Column('new_record_count', sa.Integer(), nullable=False),
    sa.Column('ingested_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_source_files_dataset_id_datasets'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_source_files')),
    sa.UniqueConstraint('dataset_id', 'sha256', name='uq_source_files_dataset_sha256'),
    sa.UniqueConstraint('id', 'dataset_id', name='uq_source_files_id_dataset')
    )
    op.create_table('records',
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('record_id', sa.String(length=256), nullable=False),
    sa.Column('shard', sa.Integer(), nullable=False),
    sa.Column('slice', sa.Integer(), nullable=False),
    sa.Column('content_sha256', sa.String(length=64), nullable=False),
    sa.Column('source_file_id', sa.Integer(), nullable=False),
    sa.Column('row_number', sa.Integer(), nullable=False),
    sa.Column('first_shard_version', sa.Integer(), nullable=False),
    sa.Column('erased_in_shard_version', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['source_file_id', 'dataset_id'], ['source_files.id', 'source_files.dataset_id'], name='fk_records_source_file', ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('dataset_id', 'record_id', name=op.f('pk_records'))
    )
    op.create_index('ix_records_dataset_shard_slice', 'records', ['dataset_id', 'shard', 'slice'], unique=False)
    op.create_table('record_identifiers',
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('keyed_hash', sa.String(length=64), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('record_id', sa.String(length=256), nullable=False),
    sa.PrimaryKeyConstraint('kind', 'keyed_hash', 'dataset_id', 'record_id', name=op.f('pk_record_identifiers'))
    )


def downgrade() -> None:
    op.drop_table('record_identifiers')
    op.drop_index('ix_records_dataset_shard_slice', table_name='records')
    op.drop_table('records')
    op.drop_table('source_files')
    op.drop_table('shard_versions')
    op.drop_table('datasets')
