"""`creditworker balance | history | add | deduct`: one user's credits."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from creditworker.cli.operations import parse_amount, run, runs
from creditworker.cli.output import JsonOption, KeyOption, console, print_json, table
from creditworker.cli.reports import DATES
from creditworker.contract.credits import DEFAULT_CREDIT_TYPE
from creditworker.contract.errors import CreditError
from creditworker.contract.operations import ADD, BALANCE, DEDUCT, HISTORY

commands = typer.Typer()

NOT_ON_THE_COMMAND_LINE = ("metadata",)
"""A JSON object: for producers and the gateway."""

CreditTypeOption = Annotated[
    str, typer.Option("--credit-type", help="Which kind of credit (types never mix).")
]


def parse_cost_basis(given: str | None) -> dict[str, str] | None:
    """`'0.02 USD'` as the contract's cost basis (the engine checks both parts)."""
    if given is None:
        return None
    amount, _space, currency = given.strip().partition(" ")
    return {"amount": amount, "currency": currency.strip()}


def entry_table(entries: list[Any], title: str) -> Table:
    shown = table(title, ("id", "kind", "amount", "held", "balance", "available", "key", "time"),
                  right=("id", "amount", "held", "balance", "available"))
    for entry in entries:
        shown.add_row(
            str(entry.id), entry.kind.value, str(entry.amount), str(entry.held),
            str(entry.balance_after), str(entry.available_after), entry.idempotency_key,
            entry.created_at.isoformat(timespec="seconds"),
        )
    return shown


@runs(BALANCE, commands)
def balance(
    user_id: str,
    at: Annotated[
        datetime | None,
        typer.Option(formats=DATES, help="The balance as it was at this moment (UTC)."),
    ] = None,
    credit_type: Annotated[
        str | None, typer.Option("--credit-type", help="One credit type (default: every type).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Show a user's total, reserved, available and soon-expiring credits."""
    info = run(BALANCE, locals())
    if as_json:
        print_json(info)
        return
    columns = ("total", "reserved", "available", f"expiring in {info.expiring_within_days} days")
    shown = table(f"{info.credit_type} of {user_id}", columns, right=columns)
    shown.add_row(str(info.total), str(info.reserved), str(info.available), str(info.expiring_soon))
    console.print(shown)
    if info.by_type is not None and len(info.by_type) > 1:
        columns = ("total", "reserved", "available")
        types = table(f"every credit type of {user_id}", ("type", *columns), right=columns)
        for name, totals in info.by_type.items():
            types.add_row(name, str(totals.total), str(totals.reserved), str(totals.available))
        console.print(types)


@runs(HISTORY, commands, renamed={"kind": "kinds"})
def history(
    user_id: str,
    limit: Annotated[int, typer.Option(help="Entries per page.")] = 50,
    before: Annotated[
        int | None, typer.Option(help="Show entries older than this entry id.")
    ] = None,
    kind: Annotated[
        list[str] | None, typer.Option(help="Only these kinds (repeatable).")
    ] = None,
    credit_type: Annotated[
        str | None, typer.Option("--credit-type", help="One credit type (default: every type).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Show a user's ledger entries, newest first."""
    entries = run(HISTORY, locals())
    if as_json:
        print_json(entries)
    else:
        console.print(entry_table(entries, f"history of {user_id}"))


def _amount(value: str) -> int:
    try:
        return parse_amount(value)
    except CreditError as exc:  # as `reports_errors` says it: the command has not started
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        raise typer.Exit(2) from None


AmountArgument = Annotated[
    int, typer.Argument(parser=_amount, show_default=False, help="Credits, a whole number.")
]
"""Parsed by `parse_amount`, not click, so that `-5` and `1.5` get the engine's own error."""


def applied_title(entry: Any, started: datetime, fresh: str) -> str:
    """The table's title: what happened, or that an earlier run with the same key already
    did it (the engine replays the first result and changes nothing)."""
    if entry.created_at < started:
        when = entry.created_at.isoformat(timespec="seconds")
        return (f"already applied at {when} (key {entry.idempotency_key}): nothing new; "
                f"the first result was: {fresh}")
    return fresh


@runs(ADD, commands, left_out=NOT_ON_THE_COMMAND_LINE, negative_numbers=True)
def add(
    user_id: str,
    amount: AmountArgument,
    expires_at: Annotated[
        datetime | None, typer.Option(help="ISO time the lot expires (UTC if no zone).")
    ] = None,
    priority: Annotated[int | None, typer.Option(help="Draw-down priority, lower first.")] = None,
    source: Annotated[
        str, typer.Option(help="purchase, bonus, subscription, adjustment or promotional.")
    ] = "purchase",
    description: Annotated[str | None, typer.Option()] = None,
    idempotency_key: KeyOption = None,
    credit_type: CreditTypeOption = DEFAULT_CREDIT_TYPE,
    effective_at: Annotated[
        datetime | None, typer.Option(help="ISO time the lot becomes spendable (pending until then).")
    ] = None,
    cost_basis: Annotated[
        str | None, typer.Option(help="Price paid per credit and its currency, e.g. '0.02 USD'.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Grant credits to a user."""
    given = dict(locals())
    started = datetime.now(UTC)
    entry = run(ADD, given, cost_basis=parse_cost_basis(cost_basis))
    if as_json:
        print_json(entry)
    else:
        title = applied_title(entry, started, f"added {entry.amount} to {user_id}")
        console.print(entry_table([entry], title))


@runs(DEDUCT, commands, left_out=NOT_ON_THE_COMMAND_LINE, negative_numbers=True)
def deduct(
    user_id: str,
    amount: AmountArgument,
    description: Annotated[str | None, typer.Option()] = None,
    idempotency_key: KeyOption = None,
    credit_type: CreditTypeOption = DEFAULT_CREDIT_TYPE,
    as_json: JsonOption = False,
) -> None:
    """Consume credits now."""
    given = dict(locals())
    started = datetime.now(UTC)
    entry = run(DEDUCT, given)
    if as_json:
        print_json(entry)
    else:
        title = applied_title(entry, started, f"deducted {-entry.amount} from {user_id}")
        console.print(entry_table([entry], title))
