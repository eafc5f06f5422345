"""Credit types through AsyncCreditService on aiosqlite and asyncpg: concurrent deducts of two
types on one account never mix, a pending grant is not spendable, and the audit holds."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from creditworker import CreditService
from creditworker.contract.errors import InsufficientCredits
from creditworker.engine.async_service import AsyncCreditService
from creditworker.records.audit import audit
from tests.inprocess.test_async_service import database_url  # noqa: F401 - the fixture


def test_concurrent_deducts_of_two_types_never_mix(database_url: str) -> None:  # noqa: F811
    async def scenario() -> tuple[int, int, int, int]:
        credits = AsyncCreditService(database_url)
        await credits.add_credits("alice", 30)
        await credits.add_credits("alice", 20, credit_type="images")
        await credits.add_credits("alice", 50, effective_at=datetime(2099, 1, 1, tzinfo=UTC))
        outcomes = await asyncio.gather(
            *[credits.deduct_credits("alice", 2, credit_type=("images" if i % 2 else "credits"))
              for i in range(40)], return_exceptions=True)
        refused = sum(isinstance(outcome, InsufficientCredits) for outcome in outcomes)
        info = await credits.get_user_credits_info("alice")
        assert info.by_type is not None
        images = info.by_type["images"].available
        await credits.dispose()
        return info.available, info.pending, images, refused

    available, pending, images, refused = asyncio.run(scenario())
    assert (available, pending, images, refused) == (30 - 2 * 15, 50, 20 - 2 * 10, 5 + 10)
    assert audit(CreditService(database_url).engine).passed
