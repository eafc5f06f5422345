"""The `creditworker` command (entry point `creditworker.cli:main`): app.py registers the
command groups, one module each.

Names are handed on lazily, so that `python -m creditworker.cli.schema` does not load every
command module before its own.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["app", "main"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'creditworker.cli' has no attribute {name!r}")
    return getattr(import_module("creditworker.cli.app"), name)
