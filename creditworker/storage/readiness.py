"""Is the database there, reachable and migrated? One line that says what to do if not.

A command run before `creditworker db upgrade`, or against a PostgreSQL database that was
never created, used to end in a traceback hundreds of lines long, and SQLite left an empty
database file behind. `ready_engine` checks first, without creating anything, and raises
`DatabaseNotReady` with the step that is missing.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import DBAPIError

from creditworker.contract.errors import DatabaseNotReady
from creditworker.storage.database import make_engine
from creditworker.storage.drivers import resolve_database_url
from creditworker.storage.migrate import current_revision, head_revision

UPGRADE = "run `creditworker db upgrade` (or `creditworker up`, which does it)"


def ready_engine(url: str) -> Engine:
    """An engine on `url`, whose schema is at the newest migration."""
    parsed = resolve_database_url(url)
    shown = parsed.render_as_string(hide_password=True)
    on_disk = parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:")
    if on_disk and not Path(str(parsed.database)).exists():
        raise DatabaseNotReady(f"no database file at {shown}: {UPGRADE}")
    engine = make_engine(url)
    try:
        revision = current_revision(engine)
    except DBAPIError as exc:
        engine.dispose()
        raise DatabaseNotReady(connection_problem(parsed, exc)) from None
    if revision is None:
        engine.dispose()
        raise DatabaseNotReady(f"no tables in {shown}: {UPGRADE}")
    head = head_revision()
    if revision != head:
        engine.dispose()
        raise DatabaseNotReady(
            f"the database {shown} is at migration {revision}, this creditworker needs {head}: {UPGRADE}"
        )
    return engine


def connection_problem(url: URL, exc: DBAPIError) -> str:
    """What went wrong connecting to `url`, in one line, with the fix where there is one."""
    shown = url.render_as_string(hide_password=True)
    detail = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
    backend = url.get_backend_name()
    host, name, user = url.host or "localhost", url.database or "", url.username or "postgres"
    if backend == "postgresql" and "does not exist" in detail and f'"{name}"' in detail:
        port = url.port or 5432
        return (f"PostgreSQL database {name!r} does not exist on {host}:{port}: create it with "
                f"`createdb -h {host} -p {port} -U {user} {name}`, then {UPGRADE}")
    if backend in ("mysql", "mariadb") and "Unknown database" in detail:
        return (f"MySQL database {name!r} does not exist on {host}:{url.port or 3306}: create it "
                f"with `CREATE DATABASE {name} CHARACTER SET utf8mb4`, then {UPGRADE}")
    return f"cannot use the database {shown}: {detail}"
