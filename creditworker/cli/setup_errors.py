"""A command that cannot start says why in one line, not in a traceback.

A wrong database URL, a database that does not exist or does not answer, a driver that is
not installed, settings that do not validate, a broker that refuses connections: each used to
end `creditworker up` (or `serve`, or any command) in a traceback of up to 460 lines. `main()`
(app.py) hands any exception that escapes a command to `describe`; what it recognises is
printed as `error: <code>: <what failed, the URL without its password, what to do>` with exit
status 2. `--debug` (or CREDITWORKER_DEBUG=1) shows the traceback instead
(tests/cli/test_setup_errors.py counts the lines).
"""

from __future__ import annotations

import os

DEBUG_VARIABLE = "CREDITWORKER_DEBUG"
BAD_URL = "bad_database_url"
NOT_READY = "database_not_ready"
BAD_SETTINGS = "invalid_settings"


def debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "").lower() in ("1", "true", "yes", "on")


def describe(exc: BaseException, database_url: str | None) -> str | None:
    """`code: message` for a setup failure, None for anything else (a bug: its traceback)."""
    from pydantic import ValidationError

    from creditworker.contract.errors import CreditError

    if isinstance(exc, CreditError):
        return f"{exc.code}: {exc.message}"
    if isinstance(exc, ValidationError):
        return f"{BAD_SETTINGS}: {_settings_problem(exc)}"
    return _database_problem(exc, database_url)


def _database_problem(exc: BaseException, database_url: str | None) -> str | None:
    from sqlalchemy.exc import ArgumentError, DBAPIError

    from creditworker.storage.drivers import (
        MissingDriver,
        UnknownDatabaseKind,
        resolve_database_url,
    )

    if isinstance(exc, MissingDriver | UnknownDatabaseKind):
        return f"{NOT_READY}: {exc}"
    if isinstance(exc, ArgumentError) and "Could not parse" in str(exc):
        return (f"{BAD_URL}: {database_url!r} is not a database URL (CREDITWORKER_DATABASE_URL "
                "or --database-url): write it as sqlite:///creditworker.db or "
                "postgresql://user:password@host:5432/name")
    if isinstance(exc, DBAPIError) and database_url:
        from creditworker.storage.readiness import connection_problem

        return f"{NOT_READY}: {connection_problem(resolve_database_url(database_url), exc)}"
    return None


def _settings_problem(exc: object) -> str:
    errors = exc.errors()  # type: ignore[attr-defined]
    parts = []
    for error in errors[:3]:
        field = ".".join(str(part) for part in error.get("loc", ()))
        parts.append(f"CREDITWORKER_{field.upper()}: {error.get('msg')}")
    return "; ".join(parts)
