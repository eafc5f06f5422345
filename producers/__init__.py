"""Producer clients: enqueue credit operations without the worker's storage stack.

The code lives in `creditworker.client`; this package keeps the documented import path
(`from producers import CreditClient`) and the old module paths (`producers.client`,
`producers.aio`). Importing it imports Celery, kombu and the shared contract only, never
SQLAlchemy, so any service can use it.
"""

from creditworker.client import AsyncCreditClient, AsyncTaskHandle, CreditClient, TaskHandle

__all__ = ["AsyncCreditClient", "AsyncTaskHandle", "CreditClient", "TaskHandle"]
