"""auto top-ups (issue 29): rules per account and credit type, and the top-ups they cause

Two tables, and `accounts.topup_threshold` (the highest threshold of the account's enabled
rules): a write that leaves an account above it reads no rules. A top-up's idempotency key is unique (one charge per key at the provider);
one top-up in flight per account and type is kept by the account's row lock, which every
write that can cross a threshold holds.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05 21:11:48.136249
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

import creditworker.storage.tables

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('accounts', sa.Column('topup_threshold', sa.BigInteger(), nullable=True))
    op.create_table('auto_topup_rules',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('user_id', sa.String(length=128).with_variant(mysql.VARCHAR(charset='utf8mb4', collation='utf8mb4_bin', length=128), 'mariadb').with_variant(mysql.VARCHAR(charset='utf8mb4', collation='utf8mb4_bin', length=128), 'mysql'), nullable=False),
    sa.Column('credit_type', sa.String(length=32).with_variant(mysql.VARCHAR(charset='utf8mb4', collation='utf8mb4_bin', length=32), 'mariadb').with_variant(mysql.VARCHAR(charset='utf8mb4', collation='utf8mb4_bin', length=32), 'mysql'), nullable=False),
    sa.Column('threshold', sa.BigInteger(), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=True),
    sa.Column('target', sa.BigInteger(), nullable=True),
    sa.Column('max_per_month', sa.Numeric(precision=24, scale=12), nullable=True),
    sa.Column('unit_price', sa.Numeric(precision=24, scale=12), nullable=True),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('expires_after_days', sa.Integer(), nullable=True),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('consecutive_failures', sa.Integer(), nullable=False),
    sa.Column('sequence', sa.BigInteger(), nullable=False),
    sa.Column('created_at', creditworker.storage.tables.UtcDateTime(), nullable=False),
    sa.Column('updated_at', creditworker.storage.tables.UtcDateTime(), nullable=False),
    sa.CheckConstraint('(amount IS NULL) <> (target IS NULL)', name=op.f('ck_auto_topup_rules_amount_or_target')),
    sa.CheckConstraint('consecutive_failures >= 0', name=op.f('ck_auto_topup_rules_failures_not_negative')),
    sa.CheckConstraint('threshold >= 0', name=op.f('ck_auto_topup_rules_threshold_not_negative')),
    sa.ForeignKeyConstraint(['user_id'], ['accounts.user_id'], name=op.f('fk_auto_topup_rules_user_id_accounts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_auto_topup_rules'))
    )
    with op.batch_alter_table('auto_topup_rules', schema=None) as batch_op:
        batch_op.create_index('uq_auto_topup_rules_user_id_credit_type', ['user_id', 'credit_type'], unique=True)

    op.create_table('topups',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('rule_id', sa.BigInteger(), nullable=False),
    sa.Column('user_id', sa.String(length=128).with_variant(mysql.VARCHAR(charset='utf8mb4', collation='utf8mb4_bin', length=128), 'mariadb').with_variant(mysql.VARCHAR(charset='utf8mb4', collation='utf8mb4_bin', length=128), 'mysql'), nullable=False),
    sa.Column('credit_type', sa.String(length=32).with_variant(mysql.VARCHAR(charset='utf8mb4', collation='utf8mb4_bin', length=32), 'mariadb').with_variant(mysql.VARCHAR(charset='utf8mb4', collation='utf8mb4_bin', length=32), 'mysql'), nullable=False),
    sa.Column('credits', sa.BigInteger(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200).with_variant(mysql.VARCHAR(charset='utf8mb4', collation='utf8mb4_bin', length=200), 'mariadb').with_variant(mysql.VARCHAR(charset='utf8mb4', collation='utf8mb4_bin', length=200), 'mysql'), nullable=False),
    sa.Column('cost', sa.Numeric(precision=24, scale=12), nullable=True),
    sa.Column('unit_price', sa.Numeric(precision=24, scale=12), nullable=True),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('expires_after_days', sa.Integer(), nullable=True),
    sa.Column('provider_reference', sa.String(length=200), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('lot_id', sa.BigInteger(), nullable=True),
    sa.Column('requested_at', creditworker.storage.tables.UtcDateTime(), nullable=False),
    sa.Column('updated_at', creditworker.storage.tables.UtcDateTime(), nullable=False),
    sa.CheckConstraint("state IN ('requested', 'charging', 'succeeded', 'failed', 'pending')", name=op.f('ck_topups_state')),
    sa.CheckConstraint('credits > 0', name=op.f('ck_topups_credits_positive')),
    sa.ForeignKeyConstraint(['user_id'], ['accounts.user_id'], name=op.f('fk_topups_user_id_accounts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_topups')),
    sa.UniqueConstraint('idempotency_key', name=op.f('uq_topups_idempotency_key'))
    )
    with op.batch_alter_table('topups', schema=None) as batch_op:
        batch_op.create_index('ix_topups_state_updated_at', ['state', 'updated_at'], unique=False)
        batch_op.create_index('ix_topups_user_id_credit_type_state', ['user_id', 'credit_type', 'state'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('topups', schema=None) as batch_op:
        batch_op.drop_index('ix_topups_user_id_credit_type_state')
        batch_op.drop_index('ix_topups_state_updated_at')

    op.drop_table('topups')
    with op.batch_alter_table('auto_topup_rules', schema=None) as batch_op:
        batch_op.drop_index('uq_auto_topup_rules_user_id_credit_type')

    op.drop_table('auto_topup_rules')
    with op.batch_alter_table('accounts', schema=None) as batch_op:
        batch_op.drop_column('topup_threshold')
