"""The two storage paths of the engine, side by side behind one protocol, chosen once.

- `postgres_arrays.PostgresArrays`: PostgreSQL through psycopg2 or psycopg 3. Raw SQL over one array
  literal per column (`unnest`), statement texts that never change, and a writer's
  statements sent together in one round trip.
- `core.Core`: SQLAlchemy Core, for every other database and driver (SQLite, MariaDB/MySQL,
  PostgreSQL through another driver).

`backend_for(connection)` is the one place that chooses (by dialect and driver, once per
pair); the engine calls the backend's methods and never asks which one it has. A new path
is a new module here implementing `base.Backend`, and one entry in `_BY_DRIVER`.
"""

from __future__ import annotations

from functools import cache

from sqlalchemy.engine import Connection, Engine

from creditworker.storage.backends.base import Backend, Script
from creditworker.storage.backends.core import Core, after
from creditworker.storage.backends.postgres_arrays import PostgresArrays

__all__ = ["Backend", "Script", "after", "backend_for"]

_BY_DRIVER: dict[tuple[str, str], type[Core]] = {
    ("postgresql", "psycopg2"): PostgresArrays,
    ("postgresql", "psycopg"): PostgresArrays,
}
"""The backends that are not `Core`, by (dialect name, driver)."""


def backend_for(bind: Connection | Engine) -> Backend:
    """The storage path for `bind`'s database and driver."""
    return _backend(bind.dialect.name, bind.dialect.driver)


@cache
def _backend(dialect: str, driver: str) -> Backend:
    return _BY_DRIVER.get((dialect, driver), Core)(dialect)
