"""CHECK constraints that back the engine's rules, and the account's explicit overdraft limit

A lot's remaining stays between 0 and its amount, nothing is held below zero, and an
account's available (balance - reserved) goes below zero only as far as its
`overdraft_limit`, which only an overage allowed by the `allow_negative` policy raises.
Reservation statuses are left to the audit (it must be able to see a tampered one).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 17:10:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

CHECKS = {
    "accounts": {
        "reserved_not_negative": "reserved >= 0",
        "overdraft_limit_not_negative": "overdraft_limit >= 0",
        "available_within_overdraft": "balance - reserved >= -overdraft_limit",
    },
    "credit_lots": {
        "amount_positive": "amount > 0",
        "remaining_in_range": "remaining >= 0 AND remaining <= amount",
    },
    "reservations": {
        "amount_positive": "amount > 0",
        "committed_amount_not_negative": "committed_amount IS NULL OR committed_amount >= 0",
    },
}


def upgrade() -> None:
    # SQLite adds a CHECK only by rebuilding the table (batch mode); `storage.migrate` runs
    # migrations with its foreign keys off, and checks them after.
    with op.batch_alter_table("accounts") as batch_op:
        batch_op.add_column(sa.Column("overdraft_limit", sa.BigInteger(), server_default="0", nullable=False))
    for table, checks in CHECKS.items():
        with op.batch_alter_table(table) as batch_op:
            for name, condition in checks.items():
                batch_op.create_check_constraint(op.f(f"ck_{table}_{name}"), condition)


def downgrade() -> None:
    for table, checks in CHECKS.items():
        with op.batch_alter_table(table) as batch_op:
            for name in checks:
                batch_op.drop_constraint(op.f(f"ck_{table}_{name}"), type_="check")
    with op.batch_alter_table("accounts") as batch_op:
        batch_op.drop_column("overdraft_limit")
