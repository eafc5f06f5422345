"""The command starts lean and reads its settings at one place."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import creditworker.cli

HEAVY = ("sqlalchemy", "alembic", "celery", "kombu", "fastapi", "creditworker.engine",
         "creditworker.storage", "creditworker.worker", "creditworker.http",
         "pydantic_settings")  # the settings are read on first use: about 15% of the start


def test_importing_the_cli_with_every_command_loads_no_storage_or_worker_stack() -> None:
    """`creditworker --help`, `schema` and typing mistakes answer without SQLAlchemy (nor the
    settings, read on first use)."""
    code = ("import sys, json, creditworker.cli.app; "
            f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({HEAVY!r}))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=60)
    assert json.loads(loaded.stdout) == []


def test_only_the_command_context_reads_the_settings() -> None:
    """Settings are read once, at the edge (cli/context.py), and handed to the commands."""
    package = Path(creditworker.cli.__file__).parent
    readers = sorted(path.name for path in package.glob("*.py")
                     if "get_settings" in path.read_text())
    assert readers == ["context.py"]
