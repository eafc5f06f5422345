"""`creditworker ledger`: the ledger's other records (refused operations, sweep runs)."""

from __future__ import annotations

from typing import Annotated

import typer

from creditworker.cli.context import current
from creditworker.cli.output import JsonOption, console, print_json, reports_errors, table
from creditworker.contract.errors import ValidationFailed

commands = typer.Typer()


@commands.command()
@reports_errors
def ledger(
    kind: Annotated[
        str | None,
        typer.Option(help="error (refused operations) or system (sweep runs); both by default."),
    ] = None,
    user: Annotated[str | None, typer.Option(help="Only this user's records.")] = None,
    limit: Annotated[int, typer.Option(help="Records per page.")] = 50,
    before: Annotated[
        int | None, typer.Option(help="Show records older than this record id.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Show the ledger's other records, newest first: refused operations and sweep runs."""
    if kind not in (None, "error", "system"):
        raise ValidationFailed(f"kind must be error or system, got {kind!r}")
    records = current().credit_service().get_ledger_records(
        kind=kind, user_id=user, limit=limit, before=before)
    if as_json:
        print_json(records)
        return
    shown = table("ledger records", ("id", "kind", "operation", "user", "code", "what", "time"),
                  right=("id",))
    for record in records:
        what = record.message if record.kind == "error" else ", ".join(
            f"{name} {count}" for name, count in record.details.items())
        shown.add_row(
            str(record.id), record.kind.value, record.operation, record.user_id or "-",
            record.code or "-", what or "", record.created_at.isoformat(timespec="seconds"),
        )
    console.print(shown)
