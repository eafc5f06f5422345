"""Balance alerts beyond `credits.low`: depleted and recovered, once per crossing.

Pure, like `rules`: a posting says the account's totals after it and what it changed, so
`available` before and after are known without another read. Operations on one account
are serialised by its row lock, so each crossing is seen by exactly one transaction and
fires once, however many deducts race (tests/engine/test_alerts.py runs them in threads on
PostgreSQL, on one type and on two at once). Every credit type of an account has its own
threshold and flag (the default type's on `accounts`, another's on its `credit_balances`
row), so `account` here is one type's totals and each type crosses on its own.
`credits.low` keeps its flag on that account (`rules.low_credit_crossing`);
`credits.recovered` fires when that flag clears, that is when `available` is back above the
low threshold. For an account with no threshold the same flag remembers a
depletion, and clears (with `credits.recovered`) once `available` is above zero again: a
new account's first grant recovers nothing.
"""

from __future__ import annotations

from enum import Enum

from creditworker.engine.rules import Account, Posting


class Crossing(Enum):
    DEPLETED = "credits.depleted"
    RECOVERED = "credits.recovered"


def available_before_and_after(posting: Posting) -> tuple[int, int]:
    after = posting.balance_after - posting.reserved_after
    return after - (posting.amount - posting.held), after


def crossings(posting: Posting, account: Account, *, threshold: int | None, was_low: bool) -> list[Crossing]:
    """What `posting` crossed: down to zero or below (depleted), back up (recovered).
    Called after `rules.low_credit_crossing` updated the account's flag for the posting."""
    before, after = available_before_and_after(posting)
    found = []
    if before > 0 >= after:
        found.append(Crossing.DEPLETED)
    if threshold is not None and threshold > 0:
        if was_low and not account.low_credit_alerted:
            found.append(Crossing.RECOVERED)
    elif Crossing.DEPLETED in found:
        account.low_credit_alerted = True
    elif account.low_credit_alerted and after > 0:
        account.low_credit_alerted = False
        found.append(Crossing.RECOVERED)
    return found
