"""dead letters

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 16:29:40.070602
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import creditworker.storage.tables

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('dead_letters',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('task_id', sa.String(length=255), nullable=True),
    sa.Column('task_name', sa.String(length=255), nullable=True),
    sa.Column('queue', sa.String(length=255), nullable=True),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('content_type', sa.String(length=255), nullable=True),
    sa.Column('content_encoding', sa.String(length=64), nullable=True),
    sa.Column('headers', sa.JSON(), nullable=False),
    sa.Column('properties', sa.JSON(), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('body_encoding', sa.String(length=16), nullable=False),
    sa.Column('body_size', sa.BigInteger(), nullable=False),
    sa.Column('received_at', creditworker.storage.tables.UtcDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_dead_letters'))
    )
    with op.batch_alter_table('dead_letters', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dead_letters_received_at'), ['received_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_dead_letters_task_id'), ['task_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('dead_letters', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dead_letters_task_id'))
        batch_op.drop_index(batch_op.f('ix_dead_letters_received_at'))

    op.drop_table('dead_letters')
