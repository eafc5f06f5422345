"""`creditworker schema` and `python -m creditworker.cli.schema`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from creditworker.cli.app import app
from creditworker.storage.tables import Base

runner = CliRunner()


@pytest.mark.parametrize(("dialect", "marker"), [
    ("postgres", "BIGSERIAL"), ("postgresql", "BIGSERIAL"), ("sqlite", "CREATE TABLE accounts"),
    ("mysql", "utf8mb4_bin"), ("mariadb", "utf8mb4_bin"),
])
def test_the_sql_backend_prints_ddl_for_each_dialect_and_alias(dialect: str, marker: str) -> None:
    result = runner.invoke(app, ["schema", "--backend", "sql", "--dialect", dialect])
    assert result.exit_code == 0, result.output
    assert marker in result.stdout and "CREATE TABLE ledger_entries" in result.stdout


def test_the_nosql_backend_prints_a_jsonschema_validator_per_stored_table() -> None:
    result = runner.invoke(app, ["schema", "--backend", "nosql"])
    assert result.exit_code == 0, result.output
    validators = json.loads(result.stdout)
    assert set(validators) == {table.name for table in Base.metadata.sorted_tables}
    entries = validators["ledger_entries"]["$jsonSchema"]
    assert entries["bsonType"] == "object"
    assert entries["properties"]["amount"]["bsonType"] == ["long", "int"]
    assert entries["properties"]["description"]["bsonType"] == ["string", "null"]
    assert entries["properties"]["created_at"]["bsonType"] == "date"
    assert {"user_id", "kind", "amount", "idempotency_key"} <= set(entries["required"])
    assert "description" not in entries["required"]
    assert validators["plans"]["$jsonSchema"]["properties"]["price"]["bsonType"] == "decimal"


def test_unknown_backends_and_dialects_are_refused_with_exit_2() -> None:
    for arguments in (["--backend", "graph"], ["--dialect", "oracle"]):
        result = runner.invoke(app, ["schema", *arguments])
        assert result.exit_code == 2 and "invalid_input" in result.output


def test_python_m_creditworker_schema_runs_the_same_command() -> None:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for arguments, marker in ((["--backend", "sql", "--dialect", "postgres"], "CREATE TABLE"),
                              (["--backend", "nosql"], "$jsonSchema"),
                              (["--json"], "SubmitBatch")):
        done = subprocess.run([sys.executable, "-m", "creditworker.cli.schema", *arguments],
                              check=False, capture_output=True, text=True, env=environment,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert marker in done.stdout


def test_json_covers_every_model_of_the_registry_and_the_events() -> None:
    from creditworker.storage.schema import public_models

    schemas = json.loads(runner.invoke(app, ["schema", "--json"]).stdout)
    assert {getattr(model, "__name__", "") for model in public_models()} <= set(schemas)
    assert {"CreatePlan", "Plan", "Subscription", "SubmitBatch", "BatchOutcome"} <= set(schemas)
