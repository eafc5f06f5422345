"""`creditworker db upgrade | current`: the database's schema migrations.

SQLAlchemy and the storage modules are imported inside the commands, so that the other
commands (and `--help`) start without them.
"""

from __future__ import annotations

import sys

import typer

from creditworker.cli.context import current
from creditworker.cli.output import console

commands = typer.Typer(help="Database schema migrations.", no_args_is_help=True)


def unreachable(exc: Exception) -> typer.Exit:
    """A database error as one line on stderr, and exit status 2."""
    from sqlalchemy.engine import make_url

    from creditworker.storage.readiness import connection_problem

    problem = connection_problem(make_url(current().database_url), exc)  # type: ignore[arg-type]
    print(f"error: database_not_ready: {problem}", file=sys.stderr)
    return typer.Exit(2)


@commands.command("upgrade")
def db_upgrade() -> None:
    """Apply every migration to the configured database."""
    from sqlalchemy.exc import DBAPIError

    from creditworker.storage.database import make_engine
    from creditworker.storage.migrate import current_revision, upgrade

    engine = make_engine(current().database_url)
    try:
        upgrade(engine)
    except DBAPIError as exc:
        raise unreachable(exc) from None
    where = engine.url.render_as_string()
    console.print(f"database at revision {current_revision(engine)}: {where}")


@commands.command("current")
def db_current() -> None:
    """Print the database's migration revision."""
    from sqlalchemy.exc import DBAPIError

    from creditworker.storage.database import make_engine
    from creditworker.storage.migrate import current_revision

    try:
        print(current_revision(make_engine(current().database_url)) or "none")
    except DBAPIError as exc:
        raise unreachable(exc) from None
