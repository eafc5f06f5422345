"""credit types and grant attributes

Lots, holds and ledger entries get `credit_type` (NOT NULL, default `credits`: every row
stored before is of the default type). The default type's totals stay on `accounts`; every
other type's totals of an account are a row of `credit_balances` (user_id, credit_type).
A lot gets `effective_at` (pending until then) and its cost basis (`cost_basis_amount` per
credit, `cost_basis_currency`); an account's `pending_until` (on both tables) is the latest
`effective_at` of its grants, so that only accounts with a grant still pending read them.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 07:10:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

import creditworker.storage.tables

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def _identifier(length: int) -> sa.types.TypeEngine[str]:
    return sa.String(length=length).with_variant(
        mysql.VARCHAR(charset='utf8mb4', collation='utf8mb4_bin', length=length), 'mariadb'
    ).with_variant(mysql.VARCHAR(charset='utf8mb4', collation='utf8mb4_bin', length=length), 'mysql')


TYPED = ('credit_lots', 'reservations', 'ledger_entries')


def upgrade() -> None:
    for table in TYPED:
        op.add_column(table, sa.Column('credit_type', _identifier(32), server_default='credits', nullable=False))
    op.add_column('credit_lots', sa.Column('effective_at', creditworker.storage.tables.UtcDateTime(), nullable=True))
    op.add_column('credit_lots', sa.Column('cost_basis_amount', sa.Numeric(24, 12), nullable=True))
    op.add_column('credit_lots', sa.Column('cost_basis_currency', sa.String(3), nullable=True))
    op.add_column('accounts', sa.Column('pending_until', creditworker.storage.tables.UtcDateTime(), nullable=True))
    op.create_table(
        'credit_balances',
        sa.Column('user_id', _identifier(128), nullable=False),
        sa.Column('credit_type', _identifier(32), nullable=False),
        sa.Column('balance', sa.BigInteger(), nullable=False),
        sa.Column('reserved', sa.BigInteger(), nullable=False),
        sa.Column('overdraft_limit', sa.BigInteger(), nullable=False),
        sa.Column('pending_until', creditworker.storage.tables.UtcDateTime(), nullable=True),
        sa.Column('created_at', creditworker.storage.tables.UtcDateTime(), nullable=False),
        sa.Column('updated_at', creditworker.storage.tables.UtcDateTime(), nullable=False),
        sa.CheckConstraint('reserved >= 0', name=op.f('ck_credit_balances_reserved_not_negative')),
        sa.CheckConstraint('overdraft_limit >= 0', name=op.f('ck_credit_balances_overdraft_limit_not_negative')),
        sa.CheckConstraint('balance - reserved >= -overdraft_limit',
                           name=op.f('ck_credit_balances_available_within_overdraft')),
        sa.ForeignKeyConstraint(['user_id'], ['accounts.user_id'], name=op.f('fk_credit_balances_user_id_accounts')),
        sa.PrimaryKeyConstraint('user_id', 'credit_type', name=op.f('pk_credit_balances')),
    )


def downgrade() -> None:
    op.drop_table('credit_balances')
    with op.batch_alter_table('accounts') as batch_op:
        batch_op.drop_column('pending_until')
    with op.batch_alter_table('credit_lots') as batch_op:
        for column in ('cost_basis_currency', 'cost_basis_amount', 'effective_at'):
            batch_op.drop_column(column)
    for table in reversed(TYPED):
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_column('credit_type')
