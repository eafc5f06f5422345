"""`creditworker correct void | refund | expiry`: corrections, each a new ledger entry."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer

from creditworker.cli.credits import entry_table
from creditworker.cli.operations import parse_amount, run, runs
from creditworker.cli.output import JsonOption, KeyOption, console, print_json
from creditworker.contract.credits import LedgerEntry
from creditworker.contract.operations import CHANGE_EXPIRY, REFUND, VOID_LOT

commands = typer.Typer(help="Corrections: void a grant, refund a deduction, move an expiry.",
                       no_args_is_help=True)

Reason = Annotated[str, typer.Argument(help="refund, chargeback, fraud, correction, or free text.")]
PartAmount = Annotated[str | None, typer.Option(help="Credits (default: all that is left).")]


def _show(entry: LedgerEntry, title: str, as_json: bool) -> None:
    if as_json:
        print_json(entry)
    else:
        console.print(entry_table([entry], title))


@runs(VOID_LOT, commands)
def void(
    lot_id: int,
    reason: Reason,
    amount: PartAmount = None,
    idempotency_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Void what is left of lot LOT_ID (or --amount of it); consumed credits stay consumed."""
    entry = run(VOID_LOT, locals(), amount=parse_amount(amount) if amount is not None else None)
    _show(entry, f"voided {-entry.amount} of lot {lot_id}", as_json)


@runs(REFUND, commands)
def refund(
    entry_id: int,
    reason: Reason,
    amount: PartAmount = None,
    idempotency_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Give back deduction or commit ENTRY_ID (or --amount of it) to the lots it drew."""
    entry = run(REFUND, locals(), amount=parse_amount(amount) if amount is not None else None)
    _show(entry, f"refunded {entry.amount} of entry {entry_id}", as_json)


@runs(CHANGE_EXPIRY, commands)
def expiry(
    lot_id: int,
    expires_at: Annotated[datetime, typer.Argument(help="ISO time (UTC if no zone); past: now.")],
    idempotency_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Move the expiry of lot LOT_ID to EXPIRES_AT."""
    entry = run(CHANGE_EXPIRY, locals())
    _show(entry, f"lot {lot_id} now expires {expires_at.isoformat()}", as_json)
