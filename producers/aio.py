"""The old path of the asyncio client: its names now live in `creditworker.client.aio`."""

from creditworker.client.aio import AsyncCreditClient, AsyncTaskHandle

__all__ = ["AsyncCreditClient", "AsyncTaskHandle"]
