"""Database URLs as people write them, and a missing driver named with the pip command that
installs it.

`postgres://` (Heroku's and many hosts' spelling) is not a SQLAlchemy dialect, and a bare
`postgresql://` makes SQLAlchemy 2.1 load psycopg 3, which the project does not install;
both used to end in a traceback of a hundred lines. `resolve_database_url` maps them to
psycopg2 (installed with the project, and the driver the engine's fastest path was measured
on; psycopg 3 works too when a URL names it, `postgresql+psycopg://`), and `naming_the_driver` turns an import failure inside engine
creation into `MissingDriver`, whose message is the install command
(tests/cli/test_setup_errors.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import import_module

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import NoSuchModuleError

INSTALL_COMMANDS = {
    "psycopg": "pip install 'psycopg[binary]>=3.2'",
    "psycopg2": "pip install psycopg2-binary",
    "pymysql": "pip install pymysql",
    "MySQLdb": "pip install mysqlclient",
    "pg8000": "pip install pg8000",
    "asyncpg": "pip install asyncpg",
    "aiosqlite": "pip install aiosqlite",
    "aiomysql": "pip install aiomysql",
    "asyncmy": "pip install asyncmy",
}
"""The top-level module a driver imports, and the command that installs it."""

KNOWN_BACKENDS = "sqlite:///file.db, postgresql://user:password@host:5432/name or mysql+pymysql://..."


class MissingDriver(ImportError):
    """A database URL names a driver that is not installed."""


class UnknownDatabaseKind(ValueError):
    """A URL whose scheme is no database SQLAlchemy knows."""


def resolve_database_url(url: str | URL) -> URL:
    """`url` parsed, with `postgres` read as `postgresql`, and a PostgreSQL URL that names no
    driver given psycopg2 (psycopg 3 where psycopg2 cannot be imported).

    Raises SQLAlchemy's ArgumentError when `url` is no URL at all (a bare name)."""
    parsed = make_url(url)
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "postgres":
        parsed = parsed.set(drivername="postgresql" + (f"+{driver}" if driver else ""))
        backend = "postgresql"
    if backend == "postgresql" and not driver and (_importable("psycopg2") or not _importable("psycopg")):
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return parsed


def _importable(module: str) -> bool:
    """Imported, not just found: psycopg 3 installed without libpq fails on import."""
    try:
        import_module(module)
    except ImportError:
        return False
    return True


@contextmanager
def naming_the_driver(url: URL) -> Iterator[None]:
    """Engine creation inside: a driver that cannot be imported becomes `MissingDriver` and an
    unknown scheme `UnknownDatabaseKind`, each a message that says what to do."""
    shown = url.render_as_string(hide_password=True)
    try:
        yield
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in INSTALL_COMMANDS:
            raise
        raise MissingDriver(
            f"the database driver {top} for {shown} is not installed: {INSTALL_COMMANDS[top]}"
        ) from exc
    except NoSuchModuleError as exc:
        raise UnknownDatabaseKind(
            f"{url.drivername!r} in {shown} is no database kind SQLAlchemy knows: write the URL "
            f"as {KNOWN_BACKENDS}"
        ) from exc
