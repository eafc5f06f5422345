"""The schema, printed for people and tools: SQL DDL per dialect, JSON schemas of the models."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.schema import CreateIndex, CreateTable

from creditworker import events, operations
from creditworker.storage.tables import Base

DIALECTS: dict[str, Dialect] = {
    "postgresql": postgresql.dialect(),  # type: ignore[no-untyped-call]
    "sqlite": sqlite.dialect(),  # type: ignore[no-untyped-call]
    "mysql": mysql.dialect(),  # type: ignore[no-untyped-call]
}

def public_models() -> list[Any]:
    """Every request and result type of every operation (from the registry), then the events."""
    return [*operations.models(), *events.EVENT_TYPES]


def ddl(dialect: str) -> str:
    """CREATE TABLE and CREATE INDEX statements for `dialect`, in dependency order."""
    try:
        target = DIALECTS[dialect]
    except KeyError:
        raise ValueError(f"unknown dialect {dialect!r}; choose from {', '.join(DIALECTS)}") from None
    statements: list[str] = []
    for table in Base.metadata.sorted_tables:
        statements.append(str(CreateTable(table).compile(dialect=target)).strip() + ";")
        for index in sorted(table.indexes, key=lambda index: str(index.name)):
            statements.append(str(CreateIndex(index).compile(dialect=target)).strip() + ";")
    return "\n\n".join(statements) + "\n"


def json_schemas() -> dict[str, Any]:
    """The JSON schema of every public model, keyed by model name."""
    return {model.__name__: TypeAdapter(model).json_schema() for model in public_models()}
