"""Every operation once: its request and result, its task, and the edges that serve it.

The worker registers its tasks from this table (one generic body, `worker/tasks.py`); the
producers take their task names and result parsers from it; `creditworker schema --json`,
the beat schedule and the wire-contract table of docs/worker.md (`contract_table`) are
derived from it; tests check the typed producer methods, the gateway's routes and the CLI
commands against it. Adding an operation is one entry here and one engine method.

Pydantic only, like the contract: producers import this module without the storage stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, get_args, get_origin, get_type_hints

from pydantic import BaseModel, ConfigDict, TypeAdapter
from typing_extensions import TypedDict, is_typeddict

from creditworker.contract.credits import (
    AddCredits,
    BatchOutcome,
    ChangeLotExpiry,
    CommitReservation,
    CreditLot,
    CreditsInfo,
    DeductCredits,
    GetCredits,
    GetExpiring,
    GetHistory,
    GetReservation,
    GetUsage,
    LedgerEntry,
    LowCreditThreshold,
    RefundDeduction,
    ReleaseReservation,
    Request,
    Reservation,
    ReserveCredits,
    SetLowCreditThreshold,
    SubmitBatch,
    UsagePeriod,
    VoidLot,
)
from creditworker.contract.plans import (
    AllocateSubscriptions,
    AssignPlan,
    ChangePlan,
    CreatePlan,
    DeletedPlan,
    DeletePlan,
    GetPlan,
    GetSubscription,
    ListPlans,
    Plan,
    RemovePlan,
    Subscription,
    UpdatePlan,
)


class NoArguments(BaseModel):
    """The request of a task that takes none (health check, beat's sweeps)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Pong(TypedDict):
    pong: bool


class Expired(TypedDict):
    expired: int


class Released(TypedDict):
    released: int


class Reminded(TypedDict):
    reminded: int


class Published(TypedDict):
    published: int


class Delivered(TypedDict):
    sent: int
    succeeded: int
    failed: int
    disabled_endpoints: list[int]
    purged: int


class Granted(TypedDict):
    granted: int


class FannedOut(TypedDict):
    chunks: int
    subscriptions: int


@dataclass(frozen=True)
class Route:
    method: str
    path: str


@dataclass(frozen=True)
class Periodic:
    """A beat schedule entry, and the setting that holds its interval in seconds."""

    entry: str
    interval_setting: str


@dataclass(frozen=True)
class Operation:
    """One operation. `engine` names the service method that serves it (`credits.<method>`
    or `subscriptions.<method>`): engine/handlers.py calls it with the request's given
    fields (and the idempotency key for a write), or through the handler its table lists
    for the operation. None: the edge has an adapter for it (worker/tasks.py: the health
    check, the event relay, the beat fan-out). `wrap` puts the engine's plain answer under
    that key (`{"expired": 3}`)."""

    task: str
    request: type[BaseModel]
    result: Any
    summary: str
    engine: str | None = None
    wrap: str | None = None
    gathered: bool = False
    producer: str | None = None
    route: Route | None = None
    cli: str | None = None
    periodic: Periodic | None = None

    @property
    def keyed(self) -> bool:
        """A write: applied once per idempotency key (given, or `task:<task id>`)."""
        return issubclass(self.request, Request)

    @cached_property
    def results(self) -> TypeAdapter[Any]:
        """Validates an envelope's `result` into the result type."""
        return TypeAdapter(self.result)


def _route(method: str, path: str) -> Route:
    return Route(method, f"/credits{path}")


ADD = Operation(
    "creditworker.credits.add", AddCredits, LedgerEntry, "Grant credits (a lot)",
    engine="credits.add_credits", gathered=True, producer="add_credits",
    route=_route("POST", "/add"), cli="add")
DEDUCT = Operation(
    "creditworker.credits.deduct", DeductCredits, LedgerEntry, "Spend credits now",
    engine="credits.deduct_credits", gathered=True, producer="deduct_credits",
    route=_route("POST", "/deduct"), cli="deduct")
RESERVE = Operation(
    "creditworker.credits.reserve", ReserveCredits, Reservation, "Hold credits until commit or release",
    engine="credits.reserve_credits", gathered=True, producer="submit_reserve",
    route=_route("POST", "/reserve"))
COMMIT = Operation(
    "creditworker.credits.commit", CommitReservation, LedgerEntry, "Spend a hold (or part, or more)",
    engine="credits.commit_reservation", gathered=True, producer="commit_reservation",
    route=_route("POST", "/reservations/{reservation_id}/commit"))
RELEASE = Operation(
    "creditworker.credits.release", ReleaseReservation, LedgerEntry, "Give a hold back",
    engine="credits.release_reservation", gathered=True, producer="release_reservation",
    route=_route("POST", "/reservations/{reservation_id}/release"))
VOID_LOT = Operation(
    "creditworker.credits.void_lot", VoidLot, LedgerEntry,
    "Remove what is left of a grant (or part), with a reason",
    engine="credits.void_lot", producer="void_lot",
    route=_route("POST", "/lots/{lot_id}/void"), cli="correct void")
REFUND = Operation(
    "creditworker.credits.refund", RefundDeduction, LedgerEntry,
    "Give back a deduction or commit (or part) to the lots it drew",
    engine="credits.refund_deduction", producer="refund_deduction",
    route=_route("POST", "/entries/{entry_id}/refund"), cli="correct refund")
CHANGE_EXPIRY = Operation(
    "creditworker.credits.change_lot_expiry", ChangeLotExpiry, LedgerEntry,
    "Extend or shorten a grant (a past moment expires it now)",
    engine="credits.change_lot_expiry", producer="change_lot_expiry",
    route=_route("POST", "/lots/{lot_id}/expiry"), cli="correct expiry")
SET_LOW_THRESHOLD = Operation(
    "creditworker.credits.set_low_threshold", SetLowCreditThreshold, LowCreditThreshold,
    "Set an account's low-credit threshold in a credit type (credits, or percent of the last grant)",
    engine="credits.set_low_credit_threshold", producer="set_low_credit_threshold",
    route=_route("PUT", "/thresholds/{user_id:path}"), cli="alerts threshold")
BALANCE = Operation(
    "creditworker.credits.balance", GetCredits, CreditsInfo, "A balance summary",
    engine="credits.get_user_credits_info", producer="get_user_credits_info",
    route=_route("GET", "/balance/{user_id:path}"), cli="balance")
HISTORY = Operation(
    "creditworker.credits.history", GetHistory, list[LedgerEntry], "Ledger entries, newest first",
    engine="credits.get_history", producer="get_history",
    route=_route("GET", "/history/{user_id:path}"), cli="history")
EXPIRING = Operation(
    "creditworker.credits.expiring", GetExpiring, list[CreditLot], "Lots expiring soon",
    engine="credits.get_expiring_credits", producer="get_expiring_credits",
    route=_route("GET", "/expiring/{user_id:path}"))
RESERVATION = Operation(
    "creditworker.credits.reservation", GetReservation, Reservation, "A reservation and its status",
    engine="credits.get_reservation", producer="get_reservation",
    route=_route("GET", "/reservations/{reservation_id}"))
USAGE = Operation(
    "creditworker.credits.usage", GetUsage, list[UsagePeriod],
    "Credits granted, consumed, expired, voided, refunded per day or month (one user or all)",
    engine="credits.get_usage", producer="get_usage", route=_route("GET", "/usage"), cli="usage")
BATCH = Operation(
    "creditworker.credits.batch", SubmitBatch, list[BatchOutcome],
    "Up to 1,000 operations in one transaction, one outcome each",
    engine="credits.apply_batch", producer="submit_batch")
PING = Operation(
    "creditworker.health.ping", NoArguments, Pong, "A round trip through broker and worker")
EXPIRE = Operation(
    "creditworker.credits.expire", NoArguments, Expired, "Expire lots past their date",
    engine="credits.expire_credits", wrap="expired",
    periodic=Periodic("expire-credits", "expire_interval_seconds"))
RELEASE_STALE = Operation(
    "creditworker.reservations.release_stale", NoArguments, Released, "Release holds past their TTL",
    engine="credits.release_stale_reservations", wrap="released",
    periodic=Periodic("release-stale-reservations", "release_stale_interval_seconds"))
REMIND = Operation(
    "creditworker.credits.remind", NoArguments, Reminded, "Send expiry reminders",
    engine="credits.send_expiry_reminders", wrap="reminded",
    periodic=Periodic("send-expiry-reminders", "reminder_interval_seconds"))
RELAY = Operation(
    "creditworker.events.relay", NoArguments, Published,
    "Publish pending events (beat, and after each change that wrote events)",
    periodic=Periodic("relay-events", "relay_interval_seconds"))
DELIVER_WEBHOOKS = Operation(
    "creditworker.webhooks.deliver", NoArguments, Delivered,
    "Send due webhook deliveries (beat for retries, and after the relay queued new ones)",
    periodic=Periodic("deliver-webhooks", "webhooks_interval_seconds"))
CREATE_PLAN = Operation(
    "creditworker.plans.create", CreatePlan, Plan, "Create a plan",
    engine="subscriptions.create_plan", producer="create_plan",
    route=_route("POST", "/plans"), cli="plans create")
UPDATE_PLAN = Operation(
    "creditworker.plans.update", UpdatePlan, Plan, "Change a plan (given fields only)",
    engine="subscriptions.update_plan", producer="update_plan",
    route=_route("PATCH", "/plans/{plan:path}"), cli="plans update")
DELETE_PLAN = Operation(
    "creditworker.plans.delete", DeletePlan, DeletedPlan,
    "Delete an unused plan (one in use is deactivated: `plan_in_use`)",
    engine="subscriptions.delete_plan", producer="delete_plan",
    route=_route("DELETE", "/plans/{plan:path}"), cli="plans delete")
GET_PLAN = Operation(
    "creditworker.plans.get", GetPlan, Plan, "A plan by id or name",
    engine="subscriptions.get_plan", producer="get_plan", route=_route("GET", "/plans/{plan:path}"))
LIST_PLANS = Operation(
    "creditworker.plans.list", ListPlans, list[Plan], "The plans",
    engine="subscriptions.list_plans", producer="list_plans",
    route=_route("GET", "/plans"), cli="plans list")
ASSIGN_PLAN = Operation(
    "creditworker.subscriptions.assign", AssignPlan, Subscription, "Subscribe a user to a plan",
    engine="subscriptions.assign_plan", producer="assign_plan",
    route=_route("PUT", "/subscriptions/{user_id:path}"), cli="plans assign")
CHANGE_PLAN = Operation(
    "creditworker.subscriptions.change", ChangePlan, Subscription, "Move a user to another plan",
    engine="subscriptions.change_plan", producer="change_plan",
    route=_route("POST", "/subscriptions/{user_id:path}/change"), cli="plans change")
REMOVE_PLAN = Operation(
    "creditworker.subscriptions.remove", RemovePlan, Subscription, "End a user's subscription",
    engine="subscriptions.remove_plan", producer="remove_plan",
    route=_route("DELETE", "/subscriptions/{user_id:path}"), cli="plans remove")
GET_SUBSCRIPTION = Operation(
    "creditworker.subscriptions.get", GetSubscription, Subscription, "A user's active subscription",
    engine="subscriptions.get_user_subscription", producer="get_user_subscription",
    route=_route("GET", "/subscriptions/{user_id:path}"), cli="plans subscription")
ALLOCATE_DUE = Operation(
    "creditworker.subscriptions.allocate_due", NoArguments, FannedOut,
    "Send the due subscriptions out in chunks (`allocate`)", cli="plans allocate",
    periodic=Periodic("allocate-subscriptions", "allocate_interval_seconds"))
ALLOCATE = Operation(
    "creditworker.subscriptions.allocate", AllocateSubscriptions, Granted,
    "Grant one chunk of due subscriptions their period (once per period)",
    engine="subscriptions.allocate", wrap="granted")

OPERATIONS: tuple[Operation, ...] = (
    ADD, DEDUCT, RESERVE, COMMIT, RELEASE, VOID_LOT, REFUND, CHANGE_EXPIRY, SET_LOW_THRESHOLD, BALANCE, HISTORY, EXPIRING,
    RESERVATION, USAGE, BATCH, PING, EXPIRE,
    RELEASE_STALE, REMIND, RELAY, DELIVER_WEBHOOKS, CREATE_PLAN, UPDATE_PLAN, DELETE_PLAN, GET_PLAN, LIST_PLANS,
    ASSIGN_PLAN, CHANGE_PLAN, REMOVE_PLAN, GET_SUBSCRIPTION, ALLOCATE_DUE, ALLOCATE,
)
BY_TASK: dict[str, Operation] = {operation.task: operation for operation in OPERATIONS}
BY_REQUEST: dict[type[BaseModel], Operation] = {
    operation.request: operation for operation in OPERATIONS if operation.request is not NoArguments
}
"""The operation a request model asks for (what a producer sends it as)."""


# ---------------------------------------------------------------- derived documents


def models() -> list[Any]:
    """Every request and result type of the operations, each once, in table order."""
    found: list[Any] = []
    for operation in OPERATIONS:
        for kind in (operation.request, operation.result):
            inner = get_args(kind)[0] if get_origin(kind) is list else kind
            if inner not in found:
                found.append(inner)
    return found


def _type_name(kind: Any) -> str:
    if get_origin(kind) is list:
        return f"list of {_type_name(get_args(kind)[0])}"
    if is_typeddict(kind):
        fields = ", ".join(f'"{name}": {getattr(field, "__name__", str(field))}'
                           for name, field in get_type_hints(kind).items())
        return f"`{{{fields}}}`".replace("|", "\\|")  # a table cell
    return f"`{kind.__name__}`"


def _arguments(request: type[BaseModel]) -> str:
    """Required first, then optional (`?`, with a default that is not null), the key last."""
    fields = sorted(request.model_fields.items(),
                    key=lambda item: (not item[1].is_required(), item[0] == "idempotency_key"))
    rendered = []
    for name, field in fields:
        if field.is_required():
            rendered.append(f"`{name}`")
        elif field.default is None:
            rendered.append(f"`{name}`?")
        else:
            default = field.default.value if hasattr(field.default, "value") else field.default
            rendered.append(f"`{name}`? ({str(default).lower() if isinstance(default, bool) else default})")
    return ", ".join(rendered) or "none"


def contract_table() -> str:
    """The wire contract as the markdown table of docs/worker.md (a test keeps them equal)."""
    lines = ["| task | keyword arguments | result | gathered | HTTP | what it does |",
             "|---|---|---|---|---|---|"]
    for operation in OPERATIONS:
        route = f"`{operation.route.method} {operation.route.path}`" if operation.route else ""
        lines.append(f"| `{operation.task}` | {_arguments(operation.request)} | {_type_name(operation.result)} "
                     f"| {'yes' if operation.gathered else ''} | {route} | {operation.summary} |")
    return "\n".join(lines) + "\n"
