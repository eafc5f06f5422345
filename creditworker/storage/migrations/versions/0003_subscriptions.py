"""plans and subscriptions

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 04:50:00.881943
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

import creditworker.storage.tables

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('plans',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=100).with_variant(mysql.VARCHAR(charset='utf8mb4', collation='utf8mb4_bin', length=100), 'mariadb').with_variant(mysql.VARCHAR(charset='utf8mb4', collation='utf8mb4_bin', length=100), 'mysql'), nullable=False),
    sa.Column('credit_limit', sa.BigInteger(), nullable=False),
    sa.Column('price', sa.Numeric(precision=18, scale=4), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('billing_period', sa.String(length=16), nullable=False),
    sa.Column('validity_days', sa.Integer(), nullable=True),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('created_at', creditworker.storage.tables.UtcDateTime(), nullable=False),
    sa.Column('updated_at', creditworker.storage.tables.UtcDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_plans')),
    sa.UniqueConstraint('name', name=op.f('uq_plans_name'))
    )
    op.create_table('subscriptions',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('user_id', sa.String(length=128).with_variant(mysql.VARCHAR(charset='utf8mb4', collation='utf8mb4_bin', length=128), 'mariadb').with_variant(mysql.VARCHAR(charset='utf8mb4', collation='utf8mb4_bin', length=128), 'mysql'), nullable=False),
    sa.Column('plan_id', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('anchor_at', creditworker.storage.tables.UtcDateTime(), nullable=False),
    sa.Column('period_index', sa.Integer(), nullable=False),
    sa.Column('current_period_start', creditworker.storage.tables.UtcDateTime(), nullable=False),
    sa.Column('current_period_end', creditworker.storage.tables.UtcDateTime(), nullable=False),
    sa.Column('pending_plan_id', sa.BigInteger(), nullable=True),
    sa.Column('cancel_at_period_end', sa.Boolean(), nullable=False),
    sa.Column('ended_at', creditworker.storage.tables.UtcDateTime(), nullable=True),
    sa.Column('created_at', creditworker.storage.tables.UtcDateTime(), nullable=False),
    sa.Column('updated_at', creditworker.storage.tables.UtcDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['pending_plan_id'], ['plans.id'], name=op.f('fk_subscriptions_pending_plan_id_plans')),
    sa.ForeignKeyConstraint(['plan_id'], ['plans.id'], name=op.f('fk_subscriptions_plan_id_plans')),
    sa.ForeignKeyConstraint(['user_id'], ['accounts.user_id'], name=op.f('fk_subscriptions_user_id_accounts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_subscriptions'))
    )
    with op.batch_alter_table('subscriptions', schema=None) as batch_op:
        batch_op.create_index('ix_subscriptions_status_current_period_end', ['status', 'current_period_end'], unique=False)
        batch_op.create_index('ix_subscriptions_user_id_status', ['user_id', 'status'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('subscriptions', schema=None) as batch_op:
        batch_op.drop_index('ix_subscriptions_user_id_status')
        batch_op.drop_index('ix_subscriptions_status_current_period_end')

    op.drop_table('subscriptions')
    op.drop_table('plans')
