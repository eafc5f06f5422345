"""How every command answers: rich tables for people, `--json` for scripts, and a refused
operation as `error: <code>: <message>` (or a JSON error) with exit status 2."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from decimal import Decimal
from functools import wraps
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from creditworker.contract.errors import CreditError

console = Console(width=None if sys.stdout.isatty() else 1000)
"""Piped or redirected output is not cut to 80 columns: a script reads whole values."""
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
    """An empty table with these columns; those in `right` are right-aligned (numbers). A
    value too long for a narrow terminal wraps, never loses its end."""
    made = Table(title=title)
    for column in columns:
        made.add_column(column, justify="right" if column in right else "left", overflow="fold")
    return made


MINOR_UNIT_DIGITS = {
    "BIF": 0, "CLP": 0, "DJF": 0, "GNF": 0, "ISK": 0, "JPY": 0, "KMF": 0, "KRW": 0, "PYG": 0,
    "RWF": 0, "UGX": 0, "UYI": 0, "VND": 0, "VUV": 0, "XAF": 0, "XOF": 0, "XPF": 0,
    "BHD": 3, "IQD": 3, "JOD": 3, "KWD": 3, "LYD": 3, "OMR": 3, "TND": 3, "CLF": 4, "UYW": 4,
}
"""ISO 4217 currencies whose minor unit is not the cent (two digits)."""


def money(amount: Decimal, currency: str) -> str:
    """`199.00 EUR`, `5000 JPY`: as many decimals as the currency has, more only when the
    amount has them (a price of 0.125 USD is shown whole, never rounded)."""
    digits = MINOR_UNIT_DIGITS.get(currency.upper(), 2)
    shown = amount.quantize(Decimal(1).scaleb(-digits)) if amount == amount.quantize(
        Decimal(1).scaleb(-digits)) else amount.normalize()
    return f"{shown:f} {currency}"
