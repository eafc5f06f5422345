"""webhooks: endpoints, deliveries and their attempts; alert rules (issue 28)

New tables only. A delivery is one event for one endpoint (unique per pair, so a relay
that fans a chunk out twice queues nothing twice); its attempts are the log.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 06:55:04.527180
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

import creditworker.storage.tables

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('webhook_endpoints',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('event_patterns', sa.JSON(), nullable=False),
    sa.Column('secret', sa.Text(), nullable=False),
    sa.Column('previous_secret', sa.Text(), nullable=True),
    sa.Column('previous_secret_expires_at', creditworker.storage.tables.UtcDateTime(), nullable=True),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('disabled_reason', sa.Text(), nullable=True),
    sa.Column('disabled_at', creditworker.storage.tables.UtcDateTime(), nullable=True),
    sa.Column('last_success_at', creditworker.storage.tables.UtcDateTime(), nullable=True),
    sa.Column('created_at', creditworker.storage.tables.UtcDateTime(), nullable=False),
    sa.Column('updated_at', creditworker.storage.tables.UtcDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_endpoints'))
    )
    op.create_table('webhook_deliveries',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('endpoint_id', sa.BigInteger(), nullable=False),
    sa.Column('event_id', sa.String(length=64).with_variant(mysql.VARCHAR(charset='utf8mb4', collation='utf8mb4_bin', length=64), 'mariadb').with_variant(mysql.VARCHAR(charset='utf8mb4', collation='utf8mb4_bin', length=64), 'mysql'), nullable=False),
    sa.Column('event_type', sa.String(length=64), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('run_attempts', sa.Integer(), nullable=False),
    sa.Column('run_started_at', creditworker.storage.tables.UtcDateTime(), nullable=False),
    sa.Column('next_attempt_at', creditworker.storage.tables.UtcDateTime(), nullable=True),
    sa.Column('claim_token', sa.String(length=32), nullable=True),
    sa.Column('last_response_status', sa.Integer(), nullable=True),
    sa.Column('created_at', creditworker.storage.tables.UtcDateTime(), nullable=False),
    sa.Column('updated_at', creditworker.storage.tables.UtcDateTime(), nullable=False),
    sa.CheckConstraint("status IN ('pending', 'succeeded', 'failed')", name=op.f('ck_webhook_deliveries_status')),
    sa.ForeignKeyConstraint(['endpoint_id'], ['webhook_endpoints.id'], name=op.f('fk_webhook_deliveries_endpoint_id_webhook_endpoints'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_deliveries'))
    )
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.create_index('ix_webhook_deliveries_endpoint_id_id', ['endpoint_id', 'id'], unique=False)
        batch_op.create_index('ix_webhook_deliveries_status_next_attempt_at', ['status', 'next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_webhook_deliveries_updated_at'), ['updated_at'], unique=False)
        batch_op.create_index('uq_webhook_deliveries_endpoint_id_event_id', ['endpoint_id', 'event_id'], unique=True)

    op.create_table('webhook_attempts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('delivery_id', sa.BigInteger(), nullable=False),
    sa.Column('endpoint_id', sa.BigInteger(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('response_status', sa.Integer(), nullable=True),
    sa.Column('response_body', sa.Text(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('duration_ms', sa.Integer(), nullable=False),
    sa.Column('attempted_at', creditworker.storage.tables.UtcDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['delivery_id'], ['webhook_deliveries.id'], name=op.f('fk_webhook_attempts_delivery_id_webhook_deliveries'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_attempts'))
    )
    with op.batch_alter_table('webhook_attempts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_webhook_attempts_attempted_at'), ['attempted_at'], unique=False)
        batch_op.create_index('ix_webhook_attempts_delivery_id_id', ['delivery_id', 'id'], unique=False)
        batch_op.create_index(batch_op.f('ix_webhook_attempts_endpoint_id'), ['endpoint_id'], unique=False)



    op.create_table('credit_alert_rules',
    sa.Column('user_id', sa.String(length=128).with_variant(mysql.VARCHAR(charset='utf8mb4', collation='utf8mb4_bin', length=128), 'mariadb').with_variant(mysql.VARCHAR(charset='utf8mb4', collation='utf8mb4_bin', length=128), 'mysql'), nullable=False),
    sa.Column('credit_type', sa.String(length=32).with_variant(mysql.VARCHAR(charset='utf8mb4', collation='utf8mb4_bin', length=32), 'mariadb').with_variant(mysql.VARCHAR(charset='utf8mb4', collation='utf8mb4_bin', length=32), 'mysql'), server_default='credits', nullable=False),
    sa.Column('low_threshold_percent', sa.Integer(), nullable=False),
    sa.Column('updated_at', creditworker.storage.tables.UtcDateTime(), nullable=False),
    sa.CheckConstraint('low_threshold_percent > 0 AND low_threshold_percent <= 100', name=op.f('ck_credit_alert_rules_percent_in_range')),
    sa.ForeignKeyConstraint(['user_id'], ['accounts.user_id'], name=op.f('fk_credit_alert_rules_user_id_accounts')),
    sa.PrimaryKeyConstraint('user_id', 'credit_type', name=op.f('pk_credit_alert_rules'))
    )


def downgrade() -> None:
    op.drop_table('credit_alert_rules')
    with op.batch_alter_table('webhook_attempts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_webhook_attempts_endpoint_id'))
        batch_op.drop_index('ix_webhook_attempts_delivery_id_id')
        batch_op.drop_index(batch_op.f('ix_webhook_attempts_attempted_at'))

    op.drop_table('webhook_attempts')
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.drop_index('uq_webhook_deliveries_endpoint_id_event_id')
        batch_op.drop_index(batch_op.f('ix_webhook_deliveries_updated_at'))
        batch_op.drop_index('ix_webhook_deliveries_status_next_attempt_at')
        batch_op.drop_index('ix_webhook_deliveries_endpoint_id_id')

    op.drop_table('webhook_deliveries')
    op.drop_table('webhook_endpoints')
