"""reports: an account's entries and holds by time, for balances at any moment

`get_user_credits_info(at=...)` finds the last entry of an account at or before a moment
(`ledger_entries (user_id, created_at, id)`: one index probe, O(log n) of its entries) and
the holds that were active then (`reservations (user_id, created_at)`).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 18:15:00
"""
from __future__ import annotations

from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_ledger_entries_user_id_created_at_id", "ledger_entries",
                    ["user_id", "created_at", "id"])
    op.create_index("ix_reservations_user_id_created_at", "reservations", ["user_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_reservations_user_id_created_at", table_name="reservations")
    op.drop_index("ix_ledger_entries_user_id_created_at_id", table_name="ledger_entries")
