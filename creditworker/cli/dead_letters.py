"""`creditworker dead-letters list | show | purge`: messages a worker could not read."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Annotated

import typer

from creditworker.cli.context import current
from creditworker.cli.output import JsonOption, console, reports_errors, table

commands = typer.Typer(
    help="Messages a worker could not read, kept instead of stopping it.", no_args_is_help=True
)


@commands.command("list")
@reports_errors
def dead_letters_list(
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many, newest first.")] = 50,
    before_id: Annotated[
        int | None, typer.Option(help="Only letters older than this id.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """List dead letters, newest first: id, time, task, task id and why."""
    letters = current().dead_letters().newest(limit=limit, before_id=before_id)
    if as_json:
        print(json.dumps([letter.as_dict() for letter in letters]))
        return
    shown = table(f"dead letters ({len(letters)} shown)",
                  ("id", "received", "task", "task id", "queue", "bytes", "reason"),
                  right=("id", "bytes"))
    for letter in letters:
        shown.add_row(
            str(letter.id), letter.received_at.isoformat(timespec="seconds"),
            letter.task_name or "", letter.task_id or "", letter.queue or "",
            str(letter.body_size), letter.reason,
        )
    console.print(shown)


@commands.command("show")
@reports_errors
def dead_letters_show(letter_id: Annotated[int, typer.Argument(help="The letter's id.")]) -> None:
    """Print one dead letter whole, as JSON: headers, properties and body as they arrived."""
    letter = current().dead_letters().get(letter_id)
    if letter is None:
        print(f"error: not_found: no dead letter {letter_id}", file=sys.stderr)
        raise typer.Exit(2)
    print(json.dumps(letter.as_dict(), indent=2))


@commands.command("purge")
@reports_errors
def dead_letters_purge(
    letter_ids: Annotated[
        list[int] | None, typer.Argument(help="Ids to delete (default: all).")
    ] = None,
    before: Annotated[
        datetime | None, typer.Option(help="Only letters received before this time (UTC).")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
) -> None:
    """Delete dead letters: the ids given, those received before a time, or all."""
    if not (letter_ids or before or yes):
        typer.confirm("Delete every dead letter?", abort=True)
    if before is not None and before.tzinfo is None:
        before = before.replace(tzinfo=UTC)
    deleted = current().dead_letters().purge(ids=letter_ids or None, before=before)
    print(f"deleted {deleted} dead letter{'s' if deleted != 1 else ''}")
