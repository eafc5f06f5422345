"""`creditworker topups ...`: auto top-up rules and the top-ups they caused (issue 29)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from creditworker.cli.operations import parse_amount, run, runs
from creditworker.cli.output import JsonOption, KeyOption, console, money, print_json, table
from creditworker.contract.operations import (
    COMPLETE_TOPUP,
    GET_AUTO_TOPUP,
    LIST_TOPUPS,
    REMOVE_AUTO_TOPUP,
    SET_AUTO_TOPUP,
)

commands = typer.Typer(help="Auto top-ups: refill a balance through a payment provider.", no_args_is_help=True)

CreditTypeOption = Annotated[str, typer.Option(help="The credit type of the rule.")]


def show_rule(rule: Any, as_json: bool) -> None:
    if as_json:
        print_json(rule)
        return
    if rule is None:
        console.print("no auto top-up rule")
        return
    buys = f"{rule.amount} credits" if rule.amount is not None else f"up to {rule.target}"
    price = f" at {money(rule.unit_price, rule.currency)} a credit" if rule.unit_price is not None else ""
    cap = f", at most {money(rule.max_per_month, rule.currency)} a month" if rule.max_per_month is not None else ""
    state = "enabled" if rule.enabled else f"disabled after {rule.consecutive_failures} failed charges"
    console.print(f"{rule.user_id} ({rule.credit_type}): below {rule.threshold}, buy {buys}{price}{cap}; {state}")


@runs(SET_AUTO_TOPUP, commands, negative_numbers=True)
def topups_set(
    user_id: str,
    threshold: str,
    amount: Annotated[str | None, typer.Option(help="Buy this many credits (or give --target).")] = None,
    target: Annotated[str | None, typer.Option(help="Top up to this balance (or give --amount).")] = None,
    credit_type: CreditTypeOption = "credits",
    max_per_month: Annotated[str | None, typer.Option(help="Most money charged a month (needs --unit-price).")] = None,
    unit_price: Annotated[str | None, typer.Option(help="Price of one credit, a decimal.")] = None,
    currency: Annotated[str, typer.Option(help="ISO 4217 code.")] = "USD",
    expires_after_days: Annotated[int | None, typer.Option(help="Bought credits expire after.")] = None,
    idempotency_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """When USER_ID's available credits drop below THRESHOLD, buy --amount (or up to --target)."""
    rule = run(SET_AUTO_TOPUP, locals(), threshold=parse_amount(threshold),
               amount=parse_amount(amount) if amount is not None else None,
               target=parse_amount(target) if target is not None else None)
    show_rule(rule, as_json)


@runs(GET_AUTO_TOPUP, commands)
def topups_show(user_id: str, credit_type: CreditTypeOption = "credits", as_json: JsonOption = False) -> None:
    """Show a user's auto top-up rule."""
    show_rule(run(GET_AUTO_TOPUP, locals()), as_json)


@runs(REMOVE_AUTO_TOPUP, commands)
def topups_remove(user_id: str, credit_type: CreditTypeOption = "credits", idempotency_key: KeyOption = None,
                  as_json: JsonOption = False) -> None:
    """Remove a user's auto top-up rule (a top-up in flight still finishes)."""
    removed = run(REMOVE_AUTO_TOPUP, locals())
    if as_json:
        print_json(removed)
    else:
        console.print("removed" if removed["removed"] else "no rule to remove")


def show_topups(topups: list[Any], as_json: bool) -> None:
    if as_json:
        print_json(topups)
        return
    shown = table("top-ups", ("id", "user", "type", "credits", "cost", "state", "reference", "error", "requested"),
                  right=("id", "credits"))
    for topup in topups:
        shown.add_row(str(topup.id), topup.user_id, topup.credit_type, str(topup.credits),
                      money(topup.cost, topup.currency) if topup.cost is not None else "",
                      topup.state.value, topup.provider_reference or "", topup.error or "",
                      f"{topup.requested_at:%Y-%m-%d %H:%M:%S}")
    console.print(shown)


@runs(LIST_TOPUPS, commands)
def topups_list(
    user_id: Annotated[str | None, typer.Option(help="One user's top-ups.")] = None,
    state: Annotated[str | None, typer.Option(help="requested, charging, succeeded, failed or pending.")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """List top-ups and their states, newest first."""
    show_topups(run(LIST_TOPUPS, locals()), as_json)


@runs(COMPLETE_TOPUP, commands, renamed={"failed": "succeeded"})
def topups_complete(
    topup_id: int,
    failed: Annotated[bool, typer.Option("--failed", help="The charge failed (default: it succeeded).")] = False,
    reference: Annotated[str | None, typer.Option(help="The provider's charge id.")] = None,
    error: Annotated[str | None, typer.Option(help="Why it failed.")] = None,
    idempotency_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Settle a pending top-up: grant its credits, or --failed."""
    show_topups([run(COMPLETE_TOPUP, locals(), succeeded=not failed)], as_json)
