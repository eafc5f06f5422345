"""The credit engine: lots, reservations, ledger entries and idempotency over SQL.

`rules` decides in plain Python, `account` loads what a transaction needs (locked, in
sorted order), `unit_of_work` collects one transaction's decisions, `writer` turns them
into set-based SQL (the one place that changes balances, lots and holds), `service` and
`subscriptions` are the public services, `sweeps` the chunked background work. It imports
nothing of Celery, HTTP or the CLI.
"""

from creditworker.engine.service import CreditService
from creditworker.engine.subscriptions import SubscriptionService

__all__ = ["CreditService", "SubscriptionService"]
