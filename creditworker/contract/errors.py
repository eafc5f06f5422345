"""Every error creditworker raises, in one hierarchy.

Each error has a stable ``code`` so producers in any language can tell them apart: the
worker returns ``{"error": {"code": ..., "message": ..., "details": ...}}`` and the Python
producers turn that back into the same exception class. This module imports nothing but
the standard library, so producers can use it without the storage stack.
"""

from __future__ import annotations

from typing import Any


class CreditError(Exception):
    """Base of every business error: the request was understood and refused."""

    code: str = "credit_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.code, self.message, self.details))


class ValidationFailed(CreditError):
    """The input is malformed: wrong type, out of range, missing or too long."""

    code = "invalid_input"


class InsufficientCredits(CreditError):
    """The available balance does not cover the amount."""

    code = "insufficient_credits"


class UnknownUser(CreditError):
    code = "unknown_user"


class UnknownReservation(CreditError):
    code = "unknown_reservation"


class ReservationNotActive(CreditError):
    """The reservation was already committed, released or expired."""

    code = "reservation_not_active"


class UnknownLot(CreditError):
    """A correction names a lot (grant) that does not exist."""

    code = "unknown_lot"


class UnknownEntry(CreditError):
    """A refund names a ledger entry that does not exist."""

    code = "unknown_entry"


class IdempotencyConflict(CreditError):
    """The idempotency key was already used for a different request."""

    code = "idempotency_conflict"


class UnknownPlan(CreditError):
    code = "unknown_plan"


class PlanInUse(CreditError):
    code = "plan_in_use"


class DuplicatePlan(CreditError):
    code = "duplicate_plan"


class UnknownSubscription(CreditError):
    code = "unknown_subscription"


class UnknownOperation(CreditError):
    """A message named a task or operation that does not exist."""

    code = "unknown_operation"


class DatabaseNotReady(CreditError):
    """The database is missing, unreachable or not migrated: a setup step is missing."""

    code = "database_not_ready"


class ServiceUnavailable(CreditError):
    """The broker, worker or database did not answer in time (transient)."""

    code = "service_unavailable"


# ---------------------------------------------------------------- webhooks (issue 28)


class InvalidWebhookUrl(ValidationFailed):
    """A webhook URL that is not http(s), too long, or resolves where deliveries may not go
    (loopback, link-local or private, unless CREDITWORKER_WEBHOOKS_ALLOW_PRIVATE=1)."""

    code = "invalid_webhook_url"


class UnknownEventPattern(ValidationFailed):
    """An event pattern that matches no event type creditworker publishes."""

    code = "unknown_event_pattern"


class UnknownWebhookEndpoint(CreditError):
    code = "unknown_webhook_endpoint"


class UnknownWebhookDelivery(CreditError):
    code = "unknown_webhook_delivery"


class WebhookSecretUnreadable(CreditError):
    """A stored signing secret is sealed and the key setting is missing or another one."""

    code = "webhook_secret_unreadable"


# ---------------------------------------------------------------- auto top-ups (issue 29)


class UnknownTopup(CreditError):
    code = "unknown_topup"


class TopupNotPending(CreditError):
    """`complete_topup` on a top-up that is not waiting for the provider's answer."""

    code = "topup_not_pending"


class PaymentProviderError(CreditError):
    """The payment provider could not be loaded, raised, or answered something other than
    succeeded, failed or pending (CREDITWORKER_PAYMENT_PROVIDER)."""

    code = "payment_provider_error"


ERRORS_BY_CODE: dict[str, type[CreditError]] = {
    cls.code: cls
    for cls in (
        CreditError,
        ValidationFailed,
        InsufficientCredits,
        UnknownUser,
        UnknownReservation,
        UnknownLot,
        UnknownEntry,
        ReservationNotActive,
        IdempotencyConflict,
        UnknownPlan,
        PlanInUse,
        DuplicatePlan,
        UnknownSubscription,
        UnknownOperation,
        ServiceUnavailable,
        DatabaseNotReady,
        InvalidWebhookUrl,
        UnknownEventPattern,
        UnknownWebhookEndpoint,
        UnknownWebhookDelivery,
        WebhookSecretUnreadable,
        UnknownTopup,
        TopupNotPending,
        PaymentProviderError,
    )
}


def _rebuild(code: str, message: str, details: dict[str, Any]) -> CreditError:
    return error_from_dict({"code": code, "message": message, "details": details})


def error_from_dict(error: dict[str, Any]) -> CreditError:
    """Turn a wire error back into its exception; unknown codes become the base class."""
    cls = ERRORS_BY_CODE.get(str(error.get("code")), CreditError)
    exc = cls(str(error.get("message", "")), **dict(error.get("details") or {}))
    if cls is CreditError and error.get("code"):
        exc.code = str(error["code"])
    return exc
