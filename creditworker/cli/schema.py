"""`creditworker schema` (and `python -m creditworker.cli.schema`, the same command alone):
print the SQL DDL, the MongoDB collection validators or the JSON schemas (storage/schema.py).

storage/schema.py (SQLAlchemy) is imported inside the command, so that the app starts
without it.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer


def schema(
    backend: Annotated[
        str, typer.Option(help="sql: DDL for --dialect; nosql: MongoDB $jsonSchema validators.")
    ] = "sql",
    dialect: Annotated[
        str, typer.Option(help="postgresql (postgres), sqlite or mysql (mariadb)")
    ] = "postgresql",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the JSON schemas of the public models instead.")
    ] = False,
) -> None:
    """Print the SQL DDL for a dialect, the MongoDB collection validators of the stored
    rows, or the JSON schemas of every request, result and event model."""
    from creditworker.storage.schema import BACKENDS, collection_validators, ddl, json_schemas

    if as_json:
        print(json.dumps(json_schemas(), indent=2))
        return
    try:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        if backend == "nosql":
            print(json.dumps(collection_validators(), indent=2))
        else:
            print(ddl(dialect), end="")
    except ValueError as exc:
        print(f"error: invalid_input: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None


def main(argv: list[str] | None = None) -> None:
    """`python -m creditworker.cli.schema [--backend sql|nosql] [--dialect ...] [--json]`."""
    alone = typer.Typer(add_completion=False)
    alone.command()(schema)
    arguments = sys.argv[1:] if argv is None else argv
    alone(args=arguments, prog_name="python -m creditworker.cli.schema")


if __name__ == "__main__":
    main()
