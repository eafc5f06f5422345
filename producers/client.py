"""The old path of the synchronous client: its names now live in `creditworker.client`."""

from creditworker.client.answers import Answer, Answers
from creditworker.client.handle import DEFAULT_TIMEOUT, TaskHandle, unwrap, wait_deadline
from creditworker.client.sync import TASKS, CreditClient

__all__ = [
    "DEFAULT_TIMEOUT",
    "TASKS",
    "Answer",
    "Answers",
    "CreditClient",
    "TaskHandle",
    "unwrap",
    "wait_deadline",
]
