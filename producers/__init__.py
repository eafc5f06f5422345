"""Producer clients: enqueue credit operations without the worker's storage stack.

Importing this package imports Celery, kombu and the shared contract only, never
SQLAlchemy, so any service can use it.
"""

from producers.aio import AsyncCreditClient, AsyncTaskHandle
from producers.client import CreditClient, TaskHandle

__all__ = ["AsyncCreditClient", "AsyncTaskHandle", "CreditClient", "TaskHandle"]
