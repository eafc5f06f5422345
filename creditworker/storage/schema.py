"""The schema, printed for people and tools: SQL DDL per dialect, MongoDB collection
validators of the stored rows, JSON schemas of the models.

`creditworker schema` prints them (cli/schema.py), as does `python -m creditworker.cli.schema`
(`--backend sql --dialect postgres`, `--backend nosql`, `--json`). The stored models are the
tables (storage/tables.py); the models of the wire are the registry's.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import JSON, Boolean, DateTime, Integer, Numeric, String, Table
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.schema import CreateIndex, CreateTable

from creditworker.contract import events, operations
from creditworker.storage.tables import Base

DIALECTS: dict[str, Dialect] = {
    "postgresql": postgresql.dialect(),  # type: ignore[no-untyped-call]
    "sqlite": sqlite.dialect(),  # type: ignore[no-untyped-call]
    "mysql": mysql.dialect(),  # type: ignore[no-untyped-call]
}
ALIASES = {"postgres": "postgresql", "mariadb": "mysql", "sqlite3": "sqlite"}
BACKENDS = ("sql", "nosql")

def public_models() -> list[Any]:
    """Every request and result type of every operation (from the registry), then the events."""
    return [*operations.models(), *events.EVENT_TYPES]


def ddl(dialect: str) -> str:
    """CREATE TABLE and CREATE INDEX statements for `dialect`, in dependency order."""
    try:
        target = DIALECTS[ALIASES.get(dialect, dialect)]
    except KeyError:
        raise ValueError(f"unknown dialect {dialect!r}; choose from {', '.join([*DIALECTS, *ALIASES])}") from None
    statements: list[str] = []
    for table in Base.metadata.sorted_tables:
        statements.append(str(CreateTable(table).compile(dialect=target)).strip() + ";")
        for index in sorted(table.indexes, key=lambda index: str(index.name)):
            statements.append(str(CreateIndex(index).compile(dialect=target)).strip() + ";")
    return "\n\n".join(statements) + "\n"


def json_schemas() -> dict[str, Any]:
    """The JSON schema of every public model, keyed by model name."""
    return {model.__name__: TypeAdapter(model).json_schema() for model in public_models()}


def collection_validators() -> dict[str, Any]:
    """A MongoDB `$jsonSchema` validator per stored table, keyed by collection name, ready
    for `db.createCollection(name, {validator: ...})` or `collMod`."""
    return {table.name: {"$jsonSchema": _json_schema_of(table)} for table in Base.metadata.sorted_tables}


def _json_schema_of(table: Table) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    required: list[str] = []
    for column in table.columns:
        bson_types, limits = _bson(column.type)
        if column.nullable and not column.primary_key:
            bson_types = [*bson_types, "null"]
        else:
            required.append(column.name)  # the writer fills every default in
        properties[column.name] = {"bsonType": bson_types[0] if len(bson_types) == 1 else bson_types, **limits}
    schema: dict[str, Any] = {"bsonType": "object", "title": table.name, "properties": properties}
    if required:
        schema["required"] = required
    if table.comment:
        schema["description"] = table.comment
    return schema


def _bson(column_type: Any) -> tuple[list[str], dict[str, Any]]:
    """BSON types (and limits) that hold what the SQL column type holds."""
    implementation = getattr(column_type, "impl", column_type)  # UtcDateTime and friends
    if isinstance(column_type, Boolean):
        return ["bool"], {}
    if isinstance(column_type, Integer):
        return ["long", "int"], {}
    if isinstance(column_type, Numeric):
        return ["decimal"], {}
    if isinstance(column_type, DateTime) or isinstance(implementation, DateTime):
        return ["date"], {}
    if isinstance(column_type, JSON):
        return ["object", "array"], {}
    if isinstance(implementation, String):
        length = getattr(implementation, "length", None)
        return ["string"], ({"maxLength": length} if length else {})
    return ["string"], {}
