"""ledger records: refused operations (error) and sweep runs (system) in the database

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25 19:50:17.086188
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

import creditworker.storage.tables

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('ledger_records',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('operation', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.String(length=128).with_variant(mysql.VARCHAR(charset='utf8mb4', collation='utf8mb4_bin', length=128), 'mariadb').with_variant(mysql.VARCHAR(charset='utf8mb4', collation='utf8mb4_bin', length=128), 'mysql'), nullable=True),
    sa.Column('code', sa.String(length=64), nullable=True),
    sa.Column('message', sa.Text(), nullable=True),
    sa.Column('details', sa.JSON(), nullable=False),
    sa.Column('created_at', creditworker.storage.tables.UtcDateTime(), nullable=False),
    sa.CheckConstraint("kind IN ('error', 'system')", name=op.f('ck_ledger_records_kind')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger_records'))
    )
    with op.batch_alter_table('ledger_records', schema=None) as batch_op:
        batch_op.create_index('ix_ledger_records_kind_id', ['kind', 'id'], unique=False)
        batch_op.create_index(batch_op.f('ix_ledger_records_user_id'), ['user_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('ledger_records', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ledger_records_user_id'))
        batch_op.drop_index('ix_ledger_records_kind_id')

    op.drop_table('ledger_records')
