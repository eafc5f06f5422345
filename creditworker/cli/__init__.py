"""The `creditworker` command (entry point `creditworker.cli:main`); the commands are in root.py.

Names are handed on lazily, so that `python -m creditworker.cli.schema` does not load root.py
before its own module.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["app", "main"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'creditworker.cli' has no attribute {name!r}")
    return getattr(import_module("creditworker.cli.root"), name)
