"""low-credit alerts per credit type (issue 28)

Every credit type other than the default gets its own low-credit threshold and its own
once-per-crossing flag, on its `credit_balances` row. The default type keeps them on
`accounts` (its operations read and write no more rows than before), so no data moves:
every threshold and flag stored before is the default type's and stays where it is.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05 21:15:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('credit_balances') as batch_op:
        batch_op.add_column(sa.Column('low_credit_threshold', sa.BigInteger(), nullable=True))
        batch_op.add_column(
            sa.Column('low_credit_alerted', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('credit_balances') as batch_op:
        batch_op.drop_column('low_credit_alerted')
        batch_op.drop_column('low_credit_threshold')
