"""The draw-down order is written twice, and both must agree.

`rules.draw_order` sorts lots in Python (what a unit of work draws from, lots it granted
itself included); the psycopg2 backend's window (`postgres_arrays.DRAW_ORDER`) picks, in
the database, the prefix of that order a draw can reach, so that a batch reads a few lots
instead of every live one. Both stay: the rules must not touch a database, and the window
must run in one. This test holds them equal: for many lot sets and every amount, the lots
the window sends are the prefix the rules would draw from.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import cast

from sqlalchemy import Table
from sqlalchemy.engine import Engine

from creditworker.engine.account import LOT_COLUMNS, SHAPES, _lot, lots_table
from creditworker.engine.rules import draw_order
from creditworker.storage.backends import backend_for
from creditworker.storage.backends.base import ReadAlong
from creditworker.storage.tables import Account


def test_the_sql_window_sends_the_prefix_of_the_rules_draw_order(pg_engine: Engine) -> None:
    generator = random.Random(26)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    users = [f"u{number}" for number in range(20)]
    accounts = cast(Table, Account.__table__)
    rows = []
    for user in users:
        for number in range(generator.randint(1, 8)):
            expires = (
                now + timedelta(days=generator.choice([1, 2, 2, 5]))
                if generator.random() < 0.7
                else None
            )
            remaining = generator.choice([0, 1, 3, 5])
            rows.append(
                {
                    "user_id": user,
                    "amount": 5,
                    "remaining": remaining,
                    "priority": generator.choice([0, 0, 1]),
                    "expires_at": expires,
                    "source": generator.choice(["purchase", "bonus", "promotional", "subscription"]),
                    "created_at": now,
                    "idempotency_key": f"{user}-{number}",
                }
            )
    generator.shuffle(rows)  # ids in no particular order against priority and expiry
    with pg_engine.begin() as connection:
        connection.execute(
            accounts.insert(),
            [
                {
                    "user_id": user,
                    "balance": 0,
                    "reserved": 0,
                    "low_credit_alerted": False,
                    "created_at": now,
                    "updated_at": now,
                }
                for user in users
            ],
        )
        connection.execute(lots_table.insert(), rows)
    backend = backend_for(pg_engine)
    with pg_engine.connect() as connection:
        every = backend.rows_where_in(
            connection, lots_table, LOT_COLUMNS, "user_id", users, where="remaining > 0"
        )
        ordered = {
            user: sorted((_lot(row) for row in every if row[1] == user), key=draw_order)
            for user in users
        }
        for amount in range(1, 25):
            needed = {user: amount for user in users}
            sent, _extra = backend.drawable_lots(connection, SHAPES, needed, ReadAlong())
            for user in users:
                prefix, before = [], 0
                for lot in ordered[user]:
                    if before >= amount:
                        break
                    prefix.append(lot.id)
                    before += lot.remaining
                assert sorted(row[0] for row in sent if row[1] == user) == sorted(prefix), (
                    user,
                    amount,
                )
