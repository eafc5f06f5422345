"""refunds name the deduction or commit they give back

A `refund` entry carries the id of the entry it refunds in `refund_of` (indexed), so that
what was already refunded of an entry is one indexed sum, under its account's lock, and the
audit can check that no entry is refunded above what it charged.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 18:02:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('ledger_entries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('refund_of', sa.BigInteger(), nullable=True))
        batch_op.create_index(batch_op.f('ix_ledger_entries_refund_of'), ['refund_of'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('ledger_entries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ledger_entries_refund_of'))
        batch_op.drop_column('refund_of')
