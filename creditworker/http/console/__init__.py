"""The operator console: accounts, ledgers, plans and the system's health at `/console`."""

from creditworker.http.console.app import create_console

__all__ = ["create_console"]
