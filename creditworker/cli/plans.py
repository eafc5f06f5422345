"""`creditworker plans ...`: subscription plans and the users on them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from creditworker.cli.context import current
from creditworker.cli.operations import parse_amount, plan_ref, run, runs
from creditworker.cli.output import JsonOption, KeyOption, console, money, print_json, table
from creditworker.contract.errors import ValidationFailed
from creditworker.contract.operations import (
    ALLOCATE_DUE,
    ASSIGN_PLAN,
    CHANGE_PLAN,
    CREATE_PLAN,
    DELETE_PLAN,
    GET_SUBSCRIPTION,
    LIST_PLANS,
    REMOVE_PLAN,
    UPDATE_PLAN,
)
from creditworker.contract.plans import ROLLOVER_FIELDS

commands = typer.Typer(help="Subscription plans and the users on them.", no_args_is_help=True)


def plans_table(plans: list[Any], title: str) -> Table:
    shown = table(title, ("id", "name", "credits", "period", "validity", "rollover", "price", "active"))
    for plan in plans:
        shown.add_row(
            str(plan.id), plan.name, str(plan.credit_limit), plan.billing_period.value,
            f"{plan.validity_days} days" if plan.validity_days else "period", rollover_text(plan),
            money(plan.price, plan.currency), "yes" if plan.active else "no",
        )
    return shown


def rollover_text(plan: Any) -> str:
    """`50 for 2 periods`, `25% for 1 period`, or `-` for a plan that rolls nothing over."""
    if plan.rollover_max is not None:
        limit = str(plan.rollover_max)
    elif plan.rollover_max_percent is not None:
        limit = f"{plan.rollover_max_percent}%"
    else:
        return "-"
    periods = plan.rollover_expires_after_periods or 1
    return f"{limit} for {periods} period{'s' if periods != 1 else ''}"


RolloverMaxOption = Annotated[int | None, typer.Option(
    help="Most unused credits of a period that roll into the next.")]
RolloverPercentOption = Annotated[int | None, typer.Option(
    help="The same limit as a percentage (0-100) of the period's allocation.")]
RolloverPeriodsOption = Annotated[int | None, typer.Option(
    help="Periods after which rolled credits expire (default 1).")]


def show_subscription(subscription: Any, as_json: bool) -> None:
    if as_json:
        print_json(subscription)
        return
    pending = f", then plan {subscription.pending_plan_id}" if subscription.pending_plan_id else ""
    ending = ", ends at period end" if subscription.cancel_at_period_end else ""
    console.print(
        f"{subscription.user_id}: plan {subscription.plan_id}, {subscription.status}, period "
        f"{subscription.period_index} {subscription.current_period_start:%Y-%m-%d %H:%M} - "
        f"{subscription.current_period_end:%Y-%m-%d %H:%M} UTC{pending}{ending}"
    )


def show_plans(shown: Any, title: str, as_json: bool) -> None:
    """A plan, or a list of plans, as JSON or as a table."""
    if as_json:
        print_json(shown)
    else:
        console.print(plans_table(shown if isinstance(shown, list) else [shown], title))


@runs(CREATE_PLAN, commands, renamed={"period": "billing_period"}, negative_numbers=True)
def plans_create(
    name: str,
    credit_limit: str,
    price: Annotated[str, typer.Option(help="Price per period, a decimal.")] = "0",
    currency: Annotated[str, typer.Option(help="ISO 4217 code.")] = "USD",
    period: Annotated[str, typer.Option(help="daily, monthly or yearly.")] = "monthly",
    validity_days: Annotated[
        int | None,
        typer.Option(help="Days each grant stays valid (default: the period)."),
    ] = None,
    active: Annotated[
        bool, typer.Option("--active/--inactive", help="Whether users can be put on it.")
    ] = True,
    rollover_max: RolloverMaxOption = None,
    rollover_max_percent: RolloverPercentOption = None,
    rollover_expires_after_periods: RolloverPeriodsOption = None,
    idempotency_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a plan granting CREDIT_LIMIT credits each period."""
    plan = run(CREATE_PLAN, locals(), credit_limit=parse_amount(credit_limit))
    show_plans(plan, "created", as_json)


@runs(UPDATE_PLAN, commands, cli_only=("no_rollover",))
def plans_update(
    plan: str,
    name: Annotated[str | None, typer.Option()] = None,
    credit_limit: Annotated[
        str | None, typer.Option(help="Credits per period, from the next period.")
    ] = None,
    price: Annotated[str | None, typer.Option()] = None,
    currency: Annotated[str | None, typer.Option()] = None,
    validity_days: Annotated[int | None, typer.Option()] = None,
    active: Annotated[bool | None, typer.Option("--active/--inactive")] = None,
    rollover_max: RolloverMaxOption = None,
    rollover_max_percent: RolloverPercentOption = None,
    rollover_expires_after_periods: RolloverPeriodsOption = None,
    no_rollover: Annotated[bool, typer.Option(
        "--no-rollover", help="Roll nothing over from now on (clears the three rollover fields).")] = False,
    idempotency_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Change a plan (by id or name): only the options given."""
    if no_rollover and any(value is not None for value in (
            rollover_max, rollover_max_percent, rollover_expires_after_periods)):
        raise ValidationFailed("give --no-rollover or the rollover options, not both")
    updated = run(UPDATE_PLAN, locals(), plan=plan_ref(plan),
                  credit_limit=parse_amount(credit_limit) if credit_limit else None,
                  cleared=ROLLOVER_FIELDS if no_rollover else ())
    show_plans(updated, "updated", as_json)


@runs(DELETE_PLAN, commands)
def plans_delete(
    plan: str, idempotency_key: KeyOption = None, as_json: JsonOption = False
) -> None:
    """Delete an unused plan; a plan users are on is deactivated instead (exit status 2)."""
    deleted = current().subscription_service().delete_plan(plan_ref(plan), idempotency_key=idempotency_key)
    if as_json:
        print_json(deleted)
    else:
        console.print(f"deleted plan {plan}")


@runs(LIST_PLANS, commands)
def plans_list(
    include_inactive: Annotated[
        bool, typer.Option("--all", help="Include inactive plans.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """List plans."""
    show_plans(run(LIST_PLANS, locals()), "plans", as_json)


@runs(ASSIGN_PLAN, commands)
def plans_assign(
    user_id: str,
    plan: str,
    start_at: Annotated[
        datetime | None,
        typer.Option(help="When the first period started (UTC if no zone)."),
    ] = None,
    idempotency_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Put a user on a plan and grant the first period's credits now."""
    show_subscription(run(ASSIGN_PLAN, locals(), plan=plan_ref(plan)), as_json)


@runs(CHANGE_PLAN, commands)
def plans_change(
    user_id: str, plan: str, idempotency_key: KeyOption = None, as_json: JsonOption = False
) -> None:
    """Upgrade now (prorated grant) or downgrade at the next period."""
    show_subscription(run(CHANGE_PLAN, locals(), plan=plan_ref(plan)), as_json)


@runs(REMOVE_PLAN, commands, renamed={"now": "at_period_end"})
def plans_remove(
    user_id: str,
    now: Annotated[
        bool, typer.Option("--now", help="End now instead of at the end of the period.")
    ] = False,
    idempotency_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Take a user off their plan (at the end of the period unless --now)."""
    show_subscription(run(REMOVE_PLAN, locals(), at_period_end=not now), as_json)


@runs(GET_SUBSCRIPTION, commands)
def plans_subscription(user_id: str, as_json: JsonOption = False) -> None:
    """Show a user's active subscription."""
    show_subscription(run(GET_SUBSCRIPTION, locals()), as_json)


@runs(ALLOCATE_DUE, commands, cli_only=("backfill",))
def plans_allocate(
    backfill: Annotated[bool, typer.Option(help="Also grant missed periods still valid.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Grant every due subscription its period now (beat sends this out to the workers)."""
    granted = current().subscription_service().allocate_due(backfill=backfill)
    if as_json:
        print_json({"granted": granted})
    else:
        console.print(f"granted {granted} periods")
