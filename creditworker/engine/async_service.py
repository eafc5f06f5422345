"""AsyncCreditService and AsyncSubscriptionService: the engine, awaitable, on asyncio drivers.

There is one implementation of the rules, the unit of work and the writer: the sync one.
The async services run it over SQLAlchemy's asyncio engine (asyncpg for PostgreSQL,
aiosqlite for SQLite) the way SQLAlchemy's own `AsyncSession.run_sync` does: the sync code
runs in a greenlet, and each of its database calls awaits the driver on the event loop.
So every method is the sync method, with the same signature, awaited; nothing blocks the
loop but the sync code's own CPU time (and the few milliseconds a retried deadlock sleeps).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from creditworker.contract.credits import OveragePolicy
from creditworker.engine.service import CreditService, embedded_tables
from creditworker.engine.subscriptions import SubscriptionService
from creditworker.storage.database import make_async_engine

T = TypeVar("T")


async def run_sync(engine: AsyncEngine, call: Callable[[], T]) -> T:
    """Run sync engine code with `engine.sync_engine`'s IO awaited on this event loop.

    `AsyncSession.run_sync` enters SQLAlchemy's greenlet bridge without checking out a
    connection; the sync code then opens its own sessions on `sync_engine`, as it does on
    a sync engine (its retries included)."""
    async with AsyncSession(engine) as session:
        return await session.run_sync(lambda _session: call())


def public_methods(cls: type) -> list[str]:
    """The public methods of a service class: what its async twin must offer."""
    return [name for name, member in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_") and name not in ("from_settings",)]


def _awaitable(name: str, sync_method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(sync_method)
    async def method(self: _AsyncTwin, *args: Any, **kwargs: Any) -> Any:
        await self._ready()
        bound = getattr(self.sync, name)
        return await run_sync(self.async_engine, lambda: bound(*args, **kwargs))

    return method


class _AsyncTwin:
    """Gives a subclass an awaitable twin of each public method of `sync_class`."""

    sync_class: type
    async_engine: AsyncEngine
    sync: Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in public_methods(cls.sync_class):
            if name not in cls.__dict__:
                setattr(cls, name, _awaitable(name, getattr(cls.sync_class, name)))

    async def _ready(self) -> None:
        return None


class AsyncCreditService(_AsyncTwin):
    """`CreditService`, awaitable: `await credits.add_credits("alice", 100)`.

    `database` is a URL (`postgresql://...`, `sqlite:///file.db`, `sqlite://` in memory;
    the asyncio driver is chosen for it) or an `AsyncEngine`. The options are
    `CreditService`'s, `create_tables` included (default: only for SQLite URLs; the tables
    are made on the first call). `sync` is the sync engine over the same connections, for
    code that is not async (`SubscriptionService(credits.sync)`).
    """

    sync_class = CreditService
    sync: CreditService

    def __init__(
        self,
        database: str | AsyncEngine,
        *,
        ledger_path: str | None = None,
        overage_policy: OveragePolicy | str = OveragePolicy.REJECT,
        expiring_soon_days: int = 7,
        low_credit_threshold: int | None = None,
        expiry_reminder_days: Sequence[int] = (7, 1),
        on_events: Callable[[int], None] | None = None,
        create_tables: bool | None = None,
    ) -> None:
        self.async_engine = make_async_engine(database) if isinstance(database, str) else database
        self.sync = CreditService(
            self.async_engine.sync_engine, ledger_path=ledger_path, overage_policy=overage_policy,
            expiring_soon_days=expiring_soon_days, low_credit_threshold=low_credit_threshold,
            expiry_reminder_days=expiry_reminder_days, on_events=on_events, create_tables=False,
        )
        wanted = embedded_tables(database) if create_tables is None else create_tables
        self._tables: asyncio.Lock | None = asyncio.Lock() if wanted else None

    @property
    def engine(self) -> Any:
        """The sync face of the asyncio engine (what `CreditService.engine` is)."""
        return self.sync.engine

    async def _ready(self) -> None:
        """Migrate on the first call when asked to (the constructor cannot await)."""
        if self._tables is None:
            return
        async with self._tables:
            if self._tables is None:
                return
            from creditworker.storage.migrate import upgrade

            await run_sync(self.async_engine, lambda: upgrade(self.sync.engine))
            self._tables = None

    async def create_tables(self) -> None:
        """Migrate the database to the newest schema now (safe when it is there)."""
        if self._tables is None:
            self._tables = asyncio.Lock()
        await self._ready()

    async def dispose(self) -> None:
        """Close the pooled connections."""
        await self.async_engine.dispose()


class AsyncSubscriptionService(_AsyncTwin):
    """`SubscriptionService`, awaitable, over an `AsyncCreditService`."""

    sync_class = SubscriptionService
    sync: SubscriptionService

    def __init__(self, credits: AsyncCreditService, **options: Any) -> None:
        self.credits = credits
        self.async_engine = credits.async_engine
        self.sync = SubscriptionService(credits.sync, **options)

    async def _ready(self) -> None:
        await self.credits._ready()
