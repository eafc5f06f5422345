"""How every command answers: rich tables for people, `--json` for scripts, and a refused
operation as `error: <code>: <message>` (or a JSON error) with exit status 2."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from creditworker.contract.errors import CreditError

console = Console()
F = TypeVar("F", bound=Callable[..., Any])

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
KeyOption = Annotated[
    str | None, typer.Option(help="Repeat the command with the same key: applied once.")
]


def reports_errors(command: F) -> F:
    """Turn a CreditError into `error: code: message` (or JSON) and exit status 2."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CreditError as exc:
            if kwargs.get("as_json"):
                print(json.dumps({"error": exc.to_dict()}, default=str), file=sys.stderr)
            else:
                print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def print_json(value: Any) -> None:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [
            item.model_dump(mode="json") if isinstance(item, BaseModel) else item
            for item in value
        ]
    print(json.dumps(value, default=str))


def table(title: str, columns: tuple[str, ...], right: tuple[str, ...] = ()) -> Table:
    """An empty table with these columns; those in `right` are right-aligned (numbers)."""
    made = Table(title=title)
    for column in columns:
        made.add_column(column, justify="right" if column in right else "left")
    return made
