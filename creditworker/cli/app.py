"""The `creditworker` command: one Typer app, one module per command group beside it.

Each command reads its input, calls the engine (or the worker launcher) and prints: rich
tables for people, `--json` for scripts (output.py). A refused operation prints
`error: <code>: <message>` and exits 2. The callback below reads the global options once and
hands them to every command (context.py).

Where a command goes: one that runs an operation of the registry is declared with
`operations.runs` in the module of its group (credits.py, plans.py); any other in the module
of its group, registered here. No module imported here imports SQLAlchemy, so `--help` and
`schema` start fast (tests/cli/test_startup.py).
"""

from __future__ import annotations

from typing import Annotated

import typer

from creditworker.cli import (
    alerts,
    audit,
    corrections,
    credits,
    db,
    dead_letters,
    events,
    ledger,
    plans,
    reports,
    running,
    webhooks,
)
from creditworker.cli.context import begin
from creditworker.cli.schema import schema

app = typer.Typer(help="Credit and subscription management.", no_args_is_help=True)


@app.callback()
def _global(
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", envvar="CREDITWORKER_DATABASE_URL",
                     help="SQLAlchemy database URL."),
    ] = None,
) -> None:
    begin(database_url)


app.command()(schema)
for top_level in (audit, credits, ledger, reports, running):
    app.add_typer(top_level.commands)
app.add_typer(db.commands, name="db")
app.add_typer(events.commands, name="events")
app.add_typer(plans.commands, name="plans")
app.add_typer(corrections.commands, name="correct")
app.add_typer(dead_letters.commands, name="dead-letters")
app.add_typer(webhooks.commands, name="webhooks")
app.add_typer(alerts.commands, name="alerts")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
