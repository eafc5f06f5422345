"""How the HTTP adapters reach the engine: in this process, or through the workers.

`Meter` is the four calls the middleware makes; `meter_for` picks the way from what the
host app gave: an engine object (sync `CreditService`, run in the engine's threads so the
event loop never blocks, or `AsyncCreditService`, awaited) or an `AsyncCreditClient`.
Either way a refusal is the same typed `CreditError`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy.exc import DBAPIError

from creditworker.contract.credits import LedgerEntry, Reservation
from creditworker.contract.errors import ServiceUnavailable
from creditworker.engine.threads import engine_threads
from creditworker.storage.database import is_transient


class Meter(Protocol):
    async def reserve(self, user_id: str, amount: int, **fields: Any) -> Reservation: ...
    async def commit(self, reservation_id: str, amount: int, **fields: Any) -> LedgerEntry: ...
    async def release(self, reservation_id: str, **fields: Any) -> LedgerEntry: ...
    async def deduct(self, user_id: str, amount: int, **fields: Any) -> LedgerEntry: ...


async def call_engine(bound: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """An engine method called: awaited if the engine is async, else in the engine's threads."""
    if inspect.iscoroutinefunction(bound):
        return await bound(*args, **kwargs)
    return await engine_threads(getattr(bound, "__self__", None)).run(functools.partial(bound, *args, **kwargs))


class EngineMeter:
    """In process: each call is one transaction of the engine. A database that does not
    answer is `ServiceUnavailable` (503), as the workers' silence is on the other path."""

    def __init__(self, service: Any) -> None:
        self.service = service

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await call_engine(getattr(self.service, method), *args, **kwargs)
        except DBAPIError as exc:
            if not is_transient(exc):
                raise
            raise ServiceUnavailable(f"the database did not answer: {type(exc.orig).__name__}") from exc

    async def reserve(self, user_id: str, amount: int, **fields: Any) -> Reservation:
        result: Reservation = await self._call("reserve_credits", user_id, amount, **fields)
        return result

    async def commit(self, reservation_id: str, amount: int, **fields: Any) -> LedgerEntry:
        result: LedgerEntry = await self._call("commit_reservation", reservation_id, amount, **fields)
        return result

    async def release(self, reservation_id: str, **fields: Any) -> LedgerEntry:
        result: LedgerEntry = await self._call("release_reservation", reservation_id, **fields)
        return result

    async def deduct(self, user_id: str, amount: int, **fields: Any) -> LedgerEntry:
        result: LedgerEntry = await self._call("deduct_credits", user_id, amount, **fields)
        return result


class WorkerMeter:
    """Through the broker: each call is a task, awaited for its result (`timeout` seconds)."""

    def __init__(self, client: Any, timeout: float) -> None:
        self.client = client
        self.timeout = timeout

    async def reserve(self, user_id: str, amount: int, **fields: Any) -> Reservation:
        result: Reservation = await self.client.reserve_credits(user_id, amount, timeout=self.timeout, **fields)
        return result

    async def commit(self, reservation_id: str, amount: int, **fields: Any) -> LedgerEntry:
        handle = await self.client.commit_reservation(reservation_id, amount, **fields)
        result: LedgerEntry = await handle.get(self.timeout)
        return result

    async def release(self, reservation_id: str, **fields: Any) -> LedgerEntry:
        handle = await self.client.release_reservation(reservation_id, **fields)
        result: LedgerEntry = await handle.get(self.timeout)
        return result

    async def deduct(self, user_id: str, amount: int, **fields: Any) -> LedgerEntry:
        handle = await self.client.deduct_credits(user_id, amount, **fields)
        result: LedgerEntry = await handle.get(self.timeout)
        return result


def meter_for(*, credit_service: Any = None, client: Any = None, timeout: float) -> Meter:
    """The meter for exactly one of an engine object and a worker client."""
    if (credit_service is None) == (client is None):
        raise TypeError("give exactly one of credit_service= (in process) and client= (through the workers)")
    return EngineMeter(credit_service) if credit_service is not None else WorkerMeter(client, timeout)
