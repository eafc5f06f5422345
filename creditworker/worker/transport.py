"""Broker transports that hand the worker every message, even one they cannot read.

kombu's Redis and filesystem transports keep each message in a JSON envelope. An entry on
the queue that is not one (bytes pushed by hand, a producer bug, an envelope without its
`properties`) makes kombu raise inside the worker's event loop, and Celery exits with
"Unrecoverable error". These transports wrap such an entry in an envelope of their own,
marked with `UNREADABLE_HEADER`, so that it reaches the worker's intake like any message
and becomes a dead letter (`creditworker.worker.intake`). The Redis channel also reuses its
client object (`conn_or_acquire`).

Both also close kombu's gaps that lose a message when a worker dies: on Redis a message
enters the unacknowledged set in the same atomic step that takes it off its queue
(`redis_take`); on the embedded broker a taken message stays on disk until it is
acknowledged (`filesystem_hold`). The rest is kombu's code.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import filesystem, redis

from creditworker.worker.filesystem_hold import HoldingChannel
from creditworker.worker.redis_take import TakingChannel

UNREADABLE_HEADER = "x-creditworker-unreadable"
"""Set on a wrapped entry: why the transport could not read it."""

_UNREADABLE_ERRORS = (ValueError, TypeError, KeyError)
"""What kombu's JSON decoding and `Message` raise on an entry that is not an envelope."""


def unreadable_envelope(
    raw: Any, reason: str, queue: str | None, delivery_tag: str | None = None
) -> dict[str, Any]:
    """A kombu envelope that carries `raw` (as it arrived, where known) and `reason`; it
    keeps `delivery_tag` when the entry had one, so that acknowledging the dead letter also
    clears the unacknowledged record made under that tag (`redis_take`)."""
    if isinstance(raw, str):
        body = raw.encode("utf-8", "surrogateescape")
    elif isinstance(raw, bytes):
        body = raw
    else:
        body = json.dumps(raw, default=repr).encode("utf-8")
    tag = delivery_tag or str(uuid.uuid4())
    return {
        "body": base64.b64encode(body).decode("ascii"),
        "content-type": "application/octet-stream",
        "content-encoding": "binary",
        "headers": {UNREADABLE_HEADER: reason[:500]},
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": tag,
            "delivery_info": {"exchange": "", "routing_key": queue or ""},
            "priority": 0,
        },
    }


def _unreadable(exc: BaseException, queue: str | None) -> dict[str, Any]:
    """The envelope for an entry whose JSON could not be loaded."""
    if isinstance(exc, json.JSONDecodeError):  # it keeps the text it could not parse
        return unreadable_envelope(exc.doc, f"not JSON: {exc}", queue)
    return unreadable_envelope(b"", f"not a readable kombu envelope: {exc!r}", queue)


def _guarded(message_class: type) -> type:
    """`message_class`, except that an entry it cannot read becomes a wrapped one."""

    class GuardedMessage(message_class):  # type: ignore[misc, valid-type]
        def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
            try:
                super().__init__(payload, channel=channel, **kwargs)
                _check_envelope(self)
            except _UNREADABLE_ERRORS as exc:
                reason = f"not a kombu message envelope: {exc!r}"
                envelope = unreadable_envelope(payload, reason, None, _delivery_tag(payload))
                super().__init__(envelope, channel=channel, **kwargs)

    return GuardedMessage


def _delivery_tag(payload: Any) -> str | None:
    properties = payload.get("properties") if isinstance(payload, dict) else None
    tag = properties.get("delivery_tag") if isinstance(properties, dict) else None
    return tag if isinstance(tag, str) else None


def _check_envelope(message: Any) -> None:
    """Raise on what kombu reads later without a check (and would then crash on)."""
    info = message.delivery_info
    if not isinstance(info, dict) or not {"exchange", "routing_key"} <= info.keys():
        raise ValueError("no delivery_info with exchange and routing_key")
    if not isinstance(message.delivery_tag, str) or not isinstance(message.headers, dict):
        raise TypeError("no delivery_tag, or headers that are not a mapping")


class _GuardedChannel:
    """What both transports share: `_get` never raises on an entry that is not JSON."""

    def _get(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return super()._get(queue, *args, **kwargs)  # type: ignore[misc]
        except _UNREADABLE_ERRORS as exc:
            return _unreadable(exc, queue)


class GuardedRedisChannel(_GuardedChannel, TakingChannel):  # type: ignore[misc]
    Message = _guarded(redis.Channel.Message)  # type: ignore[assignment]
    _client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """kombu's, except that the client is made once per connection pool, not once per
        call: kombu calls this for the unacked bookkeeping of every message it delivers or
        acks, and building a redis-py client (its table of response callbacks) took about
        a tenth of the worker's main process (py-spy, bench/run.py single)."""
        if client:
            yield client
            return
        pool = self.pool
        if self._client is None or self._client.connection_pool is not pool:
            self._client = self._create_client()
        yield self._client

    def _get_pool(self, asynchronous: bool = False) -> Any:
        """kombu's, except on a channel whose connection was closed: a connection error (the
        message stays unacknowledged in Redis and comes back after the visibility timeout)
        instead of kombu's AttributeError on the closed connection's missing URL. After a
        Redis restart, Celery closes the broken connection, and closing its channel restores
        what the channel held, through a new pool; the AttributeError escaped Celery's
        reconnect and stopped the worker ("Unrecoverable error", issue 24)."""
        if self.connection is None or self.connection.client is None:
            raise redis.get_redis_ConnectionError()("the broker connection was closed")
        return super()._get_pool(asynchronous)

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)
        except _UNREADABLE_ERRORS as exc:
            # kombu popped the entry and rotated its queue to the end of the cycle first.
            queue = self._queue_cycle.items[-1] if self._queue_cycle.items else None
            self.connection._deliver(_unreadable(exc, queue), queue)
            return True


class GuardedRedisTransport(redis.Transport):  # type: ignore[misc]
    Channel = GuardedRedisChannel


class GuardedFilesystemChannel(_GuardedChannel, HoldingChannel):  # type: ignore[misc]
    Message = _guarded(filesystem.Channel.Message)  # type: ignore[assignment]


STOP_CHECK_SECONDS = 0.25
"""How often an idle embedded worker checks whether it was asked to stop."""


class GuardedFilesystemTransport(filesystem.Transport):  # type: ignore[misc]
    Channel = GuardedFilesystemChannel

    def drain_events(self, connection: Any, timeout: float | None = None) -> Any:
        """kombu's, in slices of a quarter second: Celery's blocking loop (this transport has
        no event loop) drains for 2 s at a time and sees a stop request only between drains,
        so an idle worker took seconds to begin its warm shutdown."""
        from celery.worker import state

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = STOP_CHECK_SECONDS if deadline is None else deadline - time.monotonic()
            try:
                return super().drain_events(connection, timeout=max(0.0, min(STOP_CHECK_SECONDS, remaining)))
            except TimeoutError:
                stopping = state.should_stop is not None or state.should_terminate is not None
                if stopping or (deadline is not None and time.monotonic() >= deadline):
                    raise

    @property
    def default_connection_params(self) -> dict[str, Any]:
        """No default host: folders have none, and kombu warns "No hostname was supplied"
        each time it copies a connection whose URL names none (`filesystem://`) when the
        transport offers one."""
        return {"port": self.default_port}


TRANSPORTS = {
    "redis": "creditworker.worker.transport:GuardedRedisTransport",
    "filesystem": "creditworker.worker.transport:GuardedFilesystemTransport",
}
"""The transport class for each broker kind that keeps messages in JSON envelopes."""
