"""The asyncio producer: the same API as `CreditClient`, never blocking the event loop.

Celery's publish and result calls are blocking socket calls and there is no awaitable
result (celery/celery#6603), so each one runs in a thread. The client has a pool of its
own (`max_threads`, default 64): waiting for results must not use up asyncio's default
executor, which the rest of the application shares.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Generic, TypeVar

from celery import Celery

from creditworker.client.handle import DEFAULT_TIMEOUT, TaskHandle, wait_deadline
from creditworker.client.sync import CreditClient
from creditworker.contract.credits import (
    DEFAULT_CREDIT_TYPE,
    BatchOutcome,
    CostBasis,
    CreditLot,
    CreditsInfo,
    LedgerEntry,
    LowCreditThreshold,
    Reservation,
    UsagePeriod,
)
from creditworker.contract.plans import DeletedPlan, Plan, Subscription
from creditworker.contract.topups import AutoTopupRule, RemovedAutoTopup, Topup
from creditworker.settings import Settings

T = TypeVar("T")


class AsyncTaskHandle(Generic[T]):
    def __init__(self, handle: TaskHandle[T], executor: ThreadPoolExecutor) -> None:
        self.handle = handle
        self._executor = executor

    @property
    def task_id(self) -> str:
        return self.handle.task_id

    async def get(
        self, timeout: float = DEFAULT_TIMEOUT, *, resend_every: float | None = None
    ) -> T:
        return await _in_thread(
            self._executor, self.handle.get, timeout, resend_every=resend_every
        )

    async def resend(self) -> None:
        await _in_thread(self._executor, self.handle.resend)


async def _in_thread(
    executor: ThreadPoolExecutor, call: Callable[..., T], *args: Any, **kwargs: Any
) -> T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, functools.partial(call, *args, **kwargs))


class AsyncCreditClient:
    def __init__(
        self, settings: Settings | None = None, *, app: Celery | None = None, max_threads: int = 64
    ) -> None:
        self.sync = CreditClient(settings, app=app)
        self._executor = ThreadPoolExecutor(max_threads, thread_name_prefix="creditworker-client")

    async def _call(self, method: str, arguments: dict[str, Any]) -> Any:
        """The sync client's `method` with a typed method's arguments (its `locals()`), in a
        thread."""
        fields = {
            name: value for name, value in arguments.items() if name not in ("self", "__class__")
        }
        handle = await _in_thread(self._executor, getattr(self.sync, method), **fields)
        return AsyncTaskHandle(handle, self._executor)

    async def add_credits(
        self, user_id: str, amount: int, *, expires_at: datetime | None = None,
        priority: int | None = None, source: str = "purchase", description: str | None = None,
        metadata: dict[str, Any] | None = None, idempotency_key: str | None = None,
        credit_type: str = DEFAULT_CREDIT_TYPE, effective_at: datetime | None = None,
        cost_basis: CostBasis | dict[str, Any] | None = None,
    ) -> AsyncTaskHandle[LedgerEntry]:
        return await self._call("add_credits", locals())

    async def deduct_credits(
        self, user_id: str, amount: int, *, description: str | None = None,
        metadata: dict[str, Any] | None = None, idempotency_key: str | None = None,
        credit_type: str = DEFAULT_CREDIT_TYPE,
    ) -> AsyncTaskHandle[LedgerEntry]:
        return await self._call("deduct_credits", locals())

    async def submit_reserve(
        self, user_id: str, amount: int, *, ttl_seconds: int | None = None,
        description: str | None = None, metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None, requested_at: datetime | None = None,
        deadline: datetime | None = None, credit_type: str = DEFAULT_CREDIT_TYPE,
    ) -> AsyncTaskHandle[Reservation]:
        """As `CreditClient.submit_reserve`: enqueue without waiting."""
        arguments = {**locals(), "requested_at": requested_at or datetime.now(UTC)}
        return await self._call("submit_reserve", arguments)

    async def reserve_credits(
        self, user_id: str, amount: int, *, ttl_seconds: int | None = None,
        description: str | None = None, metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None, requested_at: datetime | None = None,
        deadline: datetime | None = None, credit_type: str = DEFAULT_CREDIT_TYPE,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Reservation:
        """As `CreditClient.reserve_credits`: never applied after this call stops waiting."""
        handle = await self.submit_reserve(
            user_id, amount, ttl_seconds=ttl_seconds, description=description, metadata=metadata,
            idempotency_key=idempotency_key, requested_at=requested_at,
            deadline=wait_deadline(timeout, deadline), credit_type=credit_type,
        )
        return await handle.get(timeout)

    async def commit_reservation(
        self, reservation_id: str, amount: int | None = None, *, description: str | None = None,
        metadata: dict[str, Any] | None = None, idempotency_key: str | None = None,
    ) -> AsyncTaskHandle[LedgerEntry]:
        return await self._call("commit_reservation", locals())

    async def release_reservation(
        self, reservation_id: str, *, idempotency_key: str | None = None
    ) -> AsyncTaskHandle[LedgerEntry]:
        return await self._call("release_reservation", locals())

    async def void_lot(
        self, lot_id: int, *, reason: str, amount: int | None = None, idempotency_key: str | None = None
    ) -> AsyncTaskHandle[LedgerEntry]:
        return await self._call("void_lot", locals())

    async def refund_deduction(
        self, entry_id: int, *, reason: str, amount: int | None = None, idempotency_key: str | None = None
    ) -> AsyncTaskHandle[LedgerEntry]:
        return await self._call("refund_deduction", locals())

    async def change_lot_expiry(
        self, lot_id: int, expires_at: datetime, *, idempotency_key: str | None = None
    ) -> AsyncTaskHandle[LedgerEntry]:
        return await self._call("change_lot_expiry", locals())

    async def set_low_credit_threshold(
        self, user_id: str, threshold: int | None = None, *, percent: int | None = None,
        credit_type: str = DEFAULT_CREDIT_TYPE, idempotency_key: str | None = None,
    ) -> AsyncTaskHandle[LowCreditThreshold]:
        """`threshold` credits or `percent` of the type's last grant; neither: the default."""
        return await self._call("set_low_credit_threshold", locals())

    async def get_user_credits_info(
        self, user_id: str, *, at: datetime | None = None, credit_type: str | None = None
    ) -> AsyncTaskHandle[CreditsInfo]:
        return await self._call("get_user_credits_info", locals())

    async def get_usage(
        self, user_id: str | None = None, *, start: datetime, end: datetime,
        granularity: str = "day", credit_type: str | None = None,
    ) -> AsyncTaskHandle[list[UsagePeriod]]:
        return await self._call("get_usage", locals())

    async def get_history(
        self, user_id: str, *, limit: int = 50, before: int | None = None,
        kinds: Sequence[str] | None = None, credit_type: str | None = None,
    ) -> AsyncTaskHandle[list[LedgerEntry]]:
        return await self._call("get_history", locals())

    async def get_expiring_credits(
        self, user_id: str, within_days: int = 7, *, credit_type: str | None = None
    ) -> AsyncTaskHandle[list[CreditLot]]:
        return await self._call("get_expiring_credits", locals())

    async def get_reservation(self, reservation_id: str) -> AsyncTaskHandle[Reservation]:
        return await self._call("get_reservation", locals())

    async def submit_batch(
        self, operations: Sequence[dict[str, Any]]
    ) -> AsyncTaskHandle[list[BatchOutcome]]:
        return await self._call("submit_batch", locals())

    # ------------------------------------------------------------ plans and subscriptions

    async def create_plan(
        self, name: str, credit_limit: int, *, price: Decimal | str | int = Decimal(0),
        currency: str = "USD", billing_period: str = "monthly", validity_days: int | None = None,
        active: bool = True, rollover_max: int | None = None, rollover_max_percent: int | None = None,
        rollover_expires_after_periods: int | None = None, idempotency_key: str | None = None,
    ) -> AsyncTaskHandle[Plan]:
        return await self._call("create_plan", locals())

    async def update_plan(
        self, plan: int | str, *, idempotency_key: str | None = None, **changes: Any
    ) -> AsyncTaskHandle[Plan]:
        arguments = {"plan": plan, **changes, "idempotency_key": idempotency_key}
        return await self._call("update_plan", arguments)

    async def delete_plan(
        self, plan: int | str, *, idempotency_key: str | None = None
    ) -> AsyncTaskHandle[DeletedPlan]:
        return await self._call("delete_plan", locals())

    async def get_plan(self, plan: int | str) -> AsyncTaskHandle[Plan]:
        return await self._call("get_plan", locals())

    async def list_plans(self, *, include_inactive: bool = False) -> AsyncTaskHandle[list[Plan]]:
        return await self._call("list_plans", locals())

    async def assign_plan(
        self, user_id: str, plan: int | str, *, start_at: datetime | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncTaskHandle[Subscription]:
        return await self._call("assign_plan", locals())

    async def change_plan(
        self, user_id: str, plan: int | str, *, idempotency_key: str | None = None
    ) -> AsyncTaskHandle[Subscription]:
        return await self._call("change_plan", locals())

    async def remove_plan(
        self, user_id: str, *, at_period_end: bool = True, idempotency_key: str | None = None
    ) -> AsyncTaskHandle[Subscription]:
        return await self._call("remove_plan", locals())

    async def get_user_subscription(self, user_id: str) -> AsyncTaskHandle[Subscription]:
        return await self._call("get_user_subscription", locals())

    async def set_auto_topup(
        self, user_id: str, *, threshold: int, amount: int | None = None, target: int | None = None,
        credit_type: str = DEFAULT_CREDIT_TYPE, max_per_month: Decimal | str | int | None = None,
        unit_price: Decimal | str | int | None = None, currency: str = "USD",
        expires_after_days: int | None = None, idempotency_key: str | None = None,
    ) -> AsyncTaskHandle[AutoTopupRule]:
        return await self._call("set_auto_topup", locals())

    async def get_auto_topup(
        self, user_id: str, *, credit_type: str = DEFAULT_CREDIT_TYPE
    ) -> AsyncTaskHandle[AutoTopupRule | None]:
        return await self._call("get_auto_topup", locals())

    async def remove_auto_topup(
        self, user_id: str, *, credit_type: str = DEFAULT_CREDIT_TYPE, idempotency_key: str | None = None
    ) -> AsyncTaskHandle[RemovedAutoTopup]:
        return await self._call("remove_auto_topup", locals())

    async def list_topups(
        self, *, user_id: str | None = None, state: str | None = None, limit: int = 50
    ) -> AsyncTaskHandle[list[Topup]]:
        return await self._call("list_topups", locals())

    async def complete_topup(
        self, topup_id: int, *, succeeded: bool, reference: str | None = None, error: str | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncTaskHandle[Topup]:
        return await self._call("complete_topup", locals())
