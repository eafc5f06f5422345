"""Redis: a live worker's messages stay invisible, a dead worker's come back within seconds.

kombu's Redis transport emulates acknowledgements (kombu/transport/redis.py, `QoS`): a
delivered message is kept in the `unacked` hash, and its delivery tag is scored with the
time of delivery in the `unacked_index` zset. Every consumer's restore sweep
(`restore_visible`, every `unacked_restore_interval` seconds) puts back on its queue any
message scored more than `visibility_timeout` seconds ago. kombu scores a message once,
when it is delivered, so the timeout has to exceed the longest time a live worker may hold
a message (a gathered batch waiting for a pool process, a long task, an ETA retry), and
after a crash every message the dead worker held waits that long: an hour by default.

This consumer step re-scores, every `visibility_timeout / HEARTBEATS_PER_TIMEOUT` seconds,
the delivery tags the worker still holds (`ZADD ... XX`, so a tag acknowledged or restored
meanwhile is never added back). A live worker's messages never look older than one
interval, however long it holds them; only a dead worker's messages age, and they come
back after the timeout, which can therefore be short (`CREDITWORKER_VISIBILITY_TIMEOUT_SECONDS`).
It runs in the worker's main process, on its event loop, like Celery's event heartbeat, and
does nothing on brokers that acknowledge deliveries themselves (RabbitMQ requeues a dead
consumer's deliveries when its connection closes).

It reads the tags from kombu's record of unacknowledged deliveries (`QoS._delivered`, the
tags `restore_unacked` would restore at shutdown); `tests/e2e/test_recovery.py` checks it
against the real transport.
"""

from __future__ import annotations

import logging
from time import time
from typing import Any

from celery import bootsteps

from creditworker.settings import HEARTBEATS_PER_TIMEOUT

logger = logging.getLogger(__name__)


def held_delivery_tags(qos: Any) -> list[str]:
    """The delivery tags a kombu virtual-transport QoS holds unacknowledged."""
    dirty = qos._dirty  # acknowledged, not yet removed from `_delivered`
    return [tag for tag in list(qos._delivered) if tag not in dirty]


def rescore(channel: Any, now: float | None = None) -> int:
    """Mark the messages held on this Redis channel as delivered `now`; returns how many."""
    qos = channel.qos
    tags = held_delivery_tags(qos)
    if not tags:
        return 0
    at = time() if now is None else now
    with qos.pipe_or_acquire() as pipe:  # the client kombu itself uses (key prefix included)
        pipe.zadd(qos.unacked_index_key, dict.fromkeys(tags, at), xx=True).execute()
    return len(tags)


class UnackedHeartbeat(bootsteps.StartStopStep):
    """Keeps the worker's unacknowledged Redis messages from being restored while it lives."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        self.timer_entry: Any = None
        super().__init__(parent, **kwargs)

    def start(self, parent: Any) -> None:
        channel = parent.task_consumer.channel
        timeout = getattr(channel, "visibility_timeout", None)
        if not timeout or not hasattr(channel.qos, "unacked_index_key"):
            return  # not the Redis transport: the broker tracks deliveries itself
        self.timer_entry = parent.timer.call_repeatedly(
            float(timeout) / HEARTBEATS_PER_TIMEOUT, self.beat, (parent,)
        )

    def stop(self, parent: Any) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None

    shutdown = stop

    def beat(self, parent: Any) -> None:
        consumer = parent.task_consumer
        if consumer is None:
            return
        try:
            rescore(consumer.channel)
        except Exception as exc:  # noqa: BLE001 (the next beat tries again; the consumer reconnects)
            logger.warning("could not mark held messages as still in progress: %r", exc)
