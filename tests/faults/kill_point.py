"""The creditworker worker app, dying on purpose at one point of the delivery path.

`celery -A tests.faults.kill_point worker ...` with `CREDITWORKER_TEST_KILL_AT=N` runs the
usual worker, except that when its Nth task message arrives from the broker it SIGKILLs its
own process group (main process and pool) before any bookkeeping of that message:

- Redis and the embedded broker: in kombu's `Transport._deliver`, right after the transport
  took the message (kombu's own Redis transport has then popped it with BRPOP and not yet
  recorded it as unacknowledged: the gap of issue 24);
- RabbitMQ: in `Consumer._receive_callback`, when the client has read the delivery.

A kill from outside lands there about once in five runs; here it lands there every time.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from kombu import messaging
from kombu.transport.virtual import base as virtual

from creditworker.worker.app import default_app

KILL_AT = int(os.environ.get("CREDITWORKER_TEST_KILL_AT", "0"))
TASK_QUEUE = "celery"

_arrived = 0


def _arrive() -> None:
    global _arrived
    _arrived += 1
    if _arrived == KILL_AT:
        os.killpg(os.getpgrp(), signal.SIGKILL)


_deliver = virtual.Transport._deliver
_receive_callback = messaging.Consumer._receive_callback


def _deliver_or_die(self: Any, message: Any, queue: str) -> Any:
    if queue == TASK_QUEUE:
        _arrive()
    return _deliver(self, message, queue)


def _receive_or_die(self: Any, message: Any) -> Any:
    if not isinstance(self.channel, virtual.Channel) and message.delivery_info.get("routing_key") == TASK_QUEUE:
        _arrive()
    return _receive_callback(self, message)


virtual.Transport._deliver = _deliver_or_die  # type: ignore[method-assign]
messaging.Consumer._receive_callback = _receive_or_die  # type: ignore[method-assign]

app = default_app()
