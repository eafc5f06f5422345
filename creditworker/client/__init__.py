"""The producers' client: enqueue credit operations without the worker's storage stack.

Importing it imports Celery, kombu and the shared contract only, never SQLAlchemy, so any
service can use it. `producers` re-exports these names (the documented import path).

- answers.py: results from a Redis result backend through one subscription per process
- handle.py: `TaskHandle`, what a call returns, and what a caller is told on a timeout
- sync.py: `CreditClient`, one method per operation
- aio.py: `AsyncCreditClient`, the same with `await`
"""

from creditworker.client.aio import AsyncCreditClient, AsyncTaskHandle
from creditworker.client.handle import DEFAULT_TIMEOUT, TaskHandle, unwrap
from creditworker.client.sync import CreditClient

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncCreditClient",
    "AsyncTaskHandle",
    "CreditClient",
    "TaskHandle",
    "unwrap",
]
