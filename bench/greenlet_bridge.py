"""The async face this project had before its thread pool, kept as a baseline for the
benchmarks: the sync engine run in SQLAlchemy's greenlet bridge (`AsyncSession.run_sync`)
over an asyncio driver (asyncpg), each database call awaited on the event loop.

Needs `greenlet` and `asyncpg` (not installed by the project: `pip install greenlet asyncpg`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from creditworker import CreditService

T = TypeVar("T")


def available() -> bool:
    try:
        import asyncpg  # noqa: F401
        import greenlet  # noqa: F401
    except ImportError:
        return False
    return True


class GreenletBridge:
    """`reserve_credits` and `commit_reservation`, awaitable, the old way."""

    def __init__(self, url: str) -> None:
        from sqlalchemy.engine import make_url
        from sqlalchemy.ext.asyncio import create_async_engine

        parsed = make_url(url).set(drivername="postgresql+asyncpg")
        self.async_engine = create_async_engine(parsed, isolation_level="READ COMMITTED")
        self.sync = CreditService(self.async_engine.sync_engine, create_tables=False)

    async def _run(self, call: Callable[[], T]) -> T:
        from sqlalchemy.ext.asyncio import AsyncSession

        async with AsyncSession(self.async_engine) as session:
            return await session.run_sync(lambda _session: call())

    async def reserve_credits(self, *args: Any, **kwargs: Any) -> Any:
        return await self._run(lambda: self.sync.reserve_credits(*args, **kwargs))

    async def commit_reservation(self, *args: Any, **kwargs: Any) -> Any:
        return await self._run(lambda: self.sync.commit_reservation(*args, **kwargs))

    async def dispose(self) -> None:
        await self.async_engine.dispose()
