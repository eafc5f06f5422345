"""rollover of unused plan credits

Plans get a rollover limit (`rollover_max` credits, or `rollover_max_percent` of the
allocation) and `rollover_expires_after_periods`. A lot gets `rolls_over` (a period's
allocation that rolls at its boundary: the expiry sweep leaves it to the allocation),
`rolled_from_lot_id` (a rolled lot's source) and, on a source after its boundary,
`rollover_left` and `rollover_expires_at` (how much of what a hold still backed may roll
when the hold ends, and when it would expire).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05 21:20:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import creditworker.storage.tables

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('plans') as batch_op:
        batch_op.add_column(sa.Column('rollover_max', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('rollover_max_percent', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('rollover_expires_after_periods', sa.Integer(), nullable=True))
        batch_op.create_check_constraint('rollover_max_not_negative', 'rollover_max >= 0')
        batch_op.create_check_constraint(
            'rollover_percent_in_range', 'rollover_max_percent >= 0 AND rollover_max_percent <= 100')
        batch_op.create_check_constraint(
            'rollover_expiry_positive', 'rollover_expires_after_periods >= 1')
    with op.batch_alter_table('credit_lots') as batch_op:
        batch_op.add_column(sa.Column('rolls_over', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('rolled_from_lot_id', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('rollover_left', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('rollover_expires_at', creditworker.storage.tables.UtcDateTime(),
                                      nullable=True))
        batch_op.create_index('ix_credit_lots_rolled_from_lot_id', ['rolled_from_lot_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('credit_lots') as batch_op:
        batch_op.drop_index('ix_credit_lots_rolled_from_lot_id')
        for column in ('rollover_expires_at', 'rollover_left', 'rolled_from_lot_id', 'rolls_over'):
            batch_op.drop_column(column)
    with op.batch_alter_table('plans') as batch_op:
        batch_op.drop_constraint('rollover_expiry_positive', type_='check')
        batch_op.drop_constraint('rollover_percent_in_range', type_='check')
        batch_op.drop_constraint('rollover_max_not_negative', type_='check')
        for column in ('rollover_expires_after_periods', 'rollover_max_percent', 'rollover_max'):
            batch_op.drop_column(column)
