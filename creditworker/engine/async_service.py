"""AsyncCreditService and AsyncSubscriptionService: the engine, awaitable.

There is one implementation of the rules, the unit of work and the writer: the sync one.
The async services run it in threads of their own (`EngineThreads`), one per call in flight,
on the sync engine's connections: the event loop only awaits the thread, so neither the
engine's CPU nor its round trips to the database stall the other requests on the loop. Every
method is the sync method, with the same signature, awaited.

Measured against running the same code in SQLAlchemy's greenlet bridge over an asyncio
driver (`bench/engine_open_loop.py`, docs/benchmarks.md): each round trip there was a stall
of the loop, and under an open loop of reserve-and-commit pairs the tail grew to hundreds of
milliseconds where the thread pool's stayed in tens, at less CPU per request.

A call whose awaiting task is cancelled runs to its end in its thread (a transaction is not
cut in the middle); its idempotency key makes a retry of it safe.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.engine import Engine, make_url

from creditworker.contract.credits import OveragePolicy
from creditworker.engine.service import CreditService
from creditworker.engine.subscriptions import SubscriptionService
from creditworker.engine.threads import EngineThreads, engine_threads

SYNC_DRIVERS = {"asyncpg": "psycopg2", "aiosqlite": "pysqlite", "aiomysql": "pymysql", "asyncmy": "pymysql"}
"""A URL written for an asyncio driver gets the sync driver of the same database."""


def public_methods(cls: type) -> list[str]:
    """The public methods of a service class: what its async twin must offer."""
    return [name for name, member in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_") and name not in ("from_settings",)]


def sync_url(url: str) -> str:
    """`url` with a sync driver where it names an asyncio one."""
    parsed = make_url(url)
    driver = SYNC_DRIVERS.get(parsed.get_driver_name())
    if driver is None:
        return url
    return parsed.set(drivername=f"{parsed.get_backend_name()}+{driver}").render_as_string(hide_password=False)


def _awaitable(name: str, sync_method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(sync_method)
    async def method(self: _AsyncTwin, *args: Any, **kwargs: Any) -> Any:
        bound = getattr(self.sync, name)
        return await self.threads.run(lambda: bound(*args, **kwargs))

    return method


class _AsyncTwin:
    """Gives a subclass an awaitable twin of each public method of `sync_class`."""

    sync_class: type
    sync: Any
    threads: EngineThreads

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in public_methods(cls.sync_class):
            if name not in cls.__dict__:
                setattr(cls, name, _awaitable(name, getattr(cls.sync_class, name)))


class AsyncCreditService(_AsyncTwin):
    """`CreditService`, awaitable: `await credits.add_credits("alice", 100)`.

    `database` is a URL (`postgresql://...`, `sqlite:///file.db`, `sqlite://` in memory; one
    naming an asyncio driver gets the same database's sync driver) or a sync `Engine`. The
    options are `CreditService`'s, `create_tables` included (default: only for SQLite URLs,
    whose tables are made when the service is built, as `CreditService` does). `sync` is the sync engine itself, for code that
    is not async (`SubscriptionService(credits.sync)`). Calls run in a thread pool as large as
    the engine's connection pool, so a call never waits in a thread for a connection.
    """

    sync_class = CreditService
    sync: CreditService

    def __init__(
        self,
        database: str | Engine,
        *,
        ledger_path: str | None = None,
        overage_policy: OveragePolicy | str = OveragePolicy.REJECT,
        expiring_soon_days: int = 7,
        low_credit_threshold: int | None = None,
        expiry_reminder_days: Sequence[int] = (7, 1),
        on_events: Callable[[int], None] | None = None,
        create_tables: bool | None = None,
        prepared_statements: bool = True,
    ) -> None:
        self.sync = CreditService(
            sync_url(database) if isinstance(database, str) else database, ledger_path=ledger_path,
            overage_policy=overage_policy, expiring_soon_days=expiring_soon_days,
            low_credit_threshold=low_credit_threshold, expiry_reminder_days=expiry_reminder_days,
            on_events=on_events, create_tables=create_tables, prepared_statements=prepared_statements,
        )
        self.threads = engine_threads(self.sync)

    @property
    def engine(self) -> Engine:
        """The engine the calls run on (what `CreditService.engine` is)."""
        return self.sync.engine

    async def create_tables(self) -> None:
        """Migrate the database to the newest schema now (safe when it is there)."""
        from creditworker.storage.migrate import upgrade

        await self.threads.run(lambda: upgrade(self.sync.engine))

    async def dispose(self) -> None:
        """Close the pooled connections (after the calls in flight end)."""
        await asyncio.get_running_loop().run_in_executor(None, self.threads.shutdown)
        self.sync.engine.dispose()


class AsyncSubscriptionService(_AsyncTwin):
    """`SubscriptionService`, awaitable, over an `AsyncCreditService` (and its threads)."""

    sync_class = SubscriptionService
    sync: SubscriptionService

    def __init__(self, credits: AsyncCreditService, **options: Any) -> None:
        self.credits = credits
        self.threads = credits.threads
        self.sync = SubscriptionService(credits.sync, **options)

