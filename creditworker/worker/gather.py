"""Gathering: the worker applies single-operation messages together, in one transaction.

One deduct per message costs a transaction per message; most of a single operation's
time is the database round trips and the commit, not the work. So the worker's main
process does not hand each add, deduct, reserve, commit or release message to the pool
on its own. It buffers them and hands the pool a list (`run_gathered`), which a pool
process applies with `CreditService.apply_batch`: one transaction, each message keeping
its own key, result or typed error, exactly as if it had run alone.

When a batch is sent: at once when no batch is running (an idle worker adds no wait);
while batches run, as soon as one returns, or beside them (up to one per pool process)
once a quarter of `CREDITWORKER_GATHER_MAX` messages wait. So the wait is bounded by one
batch's run, and the size by `CREDITWORKER_GATHER_MAX` (1 turns gathering off). Under
load batches grow, when idle they are one message long.

Exactly-once: each message is acknowledged only after its batch committed and its
result was stored; a lost pool process or a failed store requeues its messages, and
their keys (given, or `task:<task id>`) make the replay a no-op. A message with an ETA
(a retry, or a countdown) takes Celery's usual path.

This relies on Celery's documented `Task.Strategy` hook (a strategy turns a message into
work for the pool); the buffer is counted into the consumer's prefetch the way Celery
counts ETA tasks (in steps of a quarter of `CREDITWORKER_GATHER_MAX`), up to a cap, so
gathering needs no change to the prefetch setting.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from amqp import spec
from amqp.exceptions import AMQPError, MessageNacked
from celery import Celery, Task, current_app, states
from celery.app.task import Context
from celery.backends.redis import RedisBackend
from celery.backends.rpc import RPCBackend
from celery.exceptions import BackendStoreError, Retry
from kombu import Producer
from kombu.exceptions import OperationalError
from kombu.utils.encoding import safe_repr

from creditworker.worker import celery_adapter as celery_internals
from creditworker.worker.configured import settings_of

logger = logging.getLogger(__name__)

class GatheredTask(Task):  # type: ignore[misc]
    """A single credit operation whose messages the worker gathers into batches.

    A subclass says how a batch of its messages is applied (`apply_gathered`); a batch may
    mix the messages of every gathered task, and is applied by the first one's task.
    """

    Strategy = "creditworker.worker.gather:gathering_strategy"

    def apply_gathered(self, entries: list[dict[str, Any]]) -> list[dict[str, Any] | BaseException]:
        """Per message, the envelope its task returns when it runs alone, or what it raised."""
        raise NotImplementedError


@dataclass
class _Pending:
    request: Any  # celery.worker.request.Request
    counted: bool  # counted into the prefetch (below the cap)


class Gatherer:
    """The main process's buffer of gathered messages, shared by all gathered tasks."""

    def __init__(self, consumer: Any, max_size: int) -> None:
        self.consumer = consumer
        self.connection = consumer.connection
        self.max_size = max_size
        self.slots = max(1, int(getattr(consumer.pool, "num_processes", None) or consumer.app.conf.worker_concurrency or 1))
        self.cap = self.max_size * (self.slots + 1)  # messages counted into the prefetch
        # The prefetch follows the count in steps (`_count`): on RabbitMQ each change is a
        # `basic.qos` round trip, and following every message took 40% of the main
        # process in a drain (py-spy).
        self.step = max(1, self.max_size // 4)
        self.granted = 0  # added to the prefetch of `granted_to`
        self.granted_to: Any = None
        self.buffer: list[_Pending] = []
        self.running = 0
        self.counted = 0

    def add(self, request: Any) -> None:
        counted = self.counted < self.cap  # let the consumer fetch another, as for an ETA task
        if counted:
            self._count(1)
        celery_internals.reserved(request)
        self.buffer.append(_Pending(request, counted))
        self.flush()

    def flush(self) -> None:
        """Start batches: at once when none is running, and beside running ones (up to one
        per pool process) only once a quarter of a full batch waits. Two small batches at
        a time cost two transactions where one would do; in a drain on 2 cores they took
        twice the pool's CPU per message (bench/run.py single)."""
        while self.buffer and self.running < self.slots and (
            self.running == 0 or len(self.buffer) >= self.step
        ):
            batch, self.buffer = self.buffer[: self.max_size], self.buffer[self.max_size:]
            self._dispatch(batch)

    def _dispatch(self, batch: list[_Pending]) -> None:
        self.running += 1
        sent = time.monotonic()
        entries = [celery_internals.message_fields(pending.request) for pending in batch]

        def accepted(pid: int, _time_accepted: float) -> None:
            for pending in batch:
                pending.request.worker_pid = pid
                celery_internals.accepted(pending.request)
                pending.request.send_event("task-started")

        def returned(results: list[dict[str, Any]]) -> None:
            runtime = time.monotonic() - sent
            try:  # the slot is freed whatever a send or an ack on a dead channel raises
                for pending, result in zip(batch, results):
                    request = pending.request
                    if "retried" in result:  # a copy with a countdown was published in its place
                        request.send_event("task-retried", exception=result["retried"], traceback="")
                        logger.info("Task %s[%s] retry: %s", request.name, request.id, result["retried"])
                    elif "failed" in result:
                        request.send_event("task-failed", exception=result["failed"], traceback="")
                        logger.error(celery_internals.LOG_FAILURE, {"name": request.name, "id": request.id,
                                                   "description": "raised unexpected", "exc": result["failed"]})
                    else:
                        request.send_event("task-succeeded", result=repr(result), runtime=runtime)
                        logger.info(celery_internals.LOG_SUCCESS, {"name": request.name, "id": request.id, "runtime": runtime,
                                                  "return_value": safe_repr(result)})
                celery_internals.acknowledge_all([pending.request for pending in batch])
                for pending, result in zip(batch, results):
                    successful = "failed" not in result and "retried" not in result
                    self._finish(pending, lambda _request: None, successful=successful)
            finally:
                self._returned()

        def lost(error: Any) -> None:
            logger.error("a gathered batch of %d did not report back (%r); its messages are requeued,"
                         " and their keys make a repeat of what did commit a no-op",
                         len(batch), getattr(error, "exception", error))
            try:
                for pending in batch:
                    self._finish(pending, lambda request: request.reject(requeue=True), successful=False)
            finally:
                self._returned()

        self.consumer.pool.apply_async(
            run_gathered, args=(entries,), callback=returned, error_callback=lost, accept_callback=accepted,
        )

    def _finish(self, pending: _Pending, settle: Callable[[Any], None], successful: bool) -> None:
        settle(pending.request)
        celery_internals.ready(pending.request, successful=successful)
        if pending.counted:
            self._count(-1)

    def _count(self, change: int) -> None:
        """Count a message in or out. The prefetch grows by a step whenever the count
        passes what was added to it, and drops back only when nothing is counted (the
        gatherer is idle): during a drain it stays put instead of following each batch."""
        self.counted += change
        qos = self.consumer.qos
        if qos is not self.granted_to:  # a new connection's QoS: nothing granted on it yet
            self.granted_to, self.granted = qos, 0
        if self.counted > self.granted:
            qos.increment_eventually(self.step)
            self.granted += self.step
        elif self.counted == 0 and self.granted:
            qos.decrement_eventually(self.granted)
            self.granted = 0

    def _returned(self) -> None:
        self.running -= 1
        self.flush()


def gathering_strategy(task: Task, app: Celery, consumer: Any, **options: Any) -> Callable[..., Any]:
    """Celery's default strategy, except that gathered messages go to the consumer's Gatherer."""
    usual = celery_internals.usual_strategy(task, app, consumer, **options)
    max_size = settings_of(app).gather_max
    if max_size <= 1:
        return usual
    gatherer: Gatherer | None = getattr(consumer, "_creditworker_gatherer", None)
    # One gatherer per broker connection: after a reconnect, what the old one held was
    # delivered on the dead connection and comes back from the broker (RabbitMQ at once,
    # Redis after the visibility timeout); a batch still counted as running there must not
    # keep the new connection's messages waiting (tests/faults, RabbitMQ restart).
    if gatherer is None or gatherer.max_size != max_size or gatherer.connection is not consumer.connection:
        gatherer = Gatherer(consumer, max_size)
        consumer._creditworker_gatherer = gatherer
    build_request = celery_internals.request_builder(task, app, consumer)
    revoked = celery_internals.revoked_ids(consumer)
    eventer = consumer.event_dispatcher
    send_events = bool(eventer and eventer.enabled and task.send_events)

    def handle(message: Any, payload: Any, ack: Any, reject: Any, callbacks: Any, **kwargs: Any) -> Any:
        request = build_request(message, payload, ack, reject)
        if request.eta:
            return usual(message, payload, ack, reject, callbacks, **kwargs)
        logger.info(celery_internals.LOG_RECEIVED, {"name": request.name, "id": request.id})
        if (request.expires or request.id in revoked) and request.revoked():
            return None
        if send_events:
            request.send_event(
                "task-received", name=request.name, args=request.argsrepr, kwargs=request.kwargsrepr,
                root_id=request.root_id, parent_id=request.parent_id,
                retries=request.request_dict.get("retries", 0),
            )
        for callback in callbacks or ():
            callback(request)
        gatherer.add(request)
        return None

    return handle


STORE_UNLESS_SUCCEEDED = """
for i, key in ipairs(KEYS) do
  local current = redis.call('GET', key)
  if not (current and cjson.decode(current)['status'] == 'SUCCESS') then
    if ARGV[1] == '0' then
      redis.call('SET', key, ARGV[i + 1])
    else
      redis.call('SETEX', key, ARGV[1], ARGV[i + 1])
    end
    redis.call('PUBLISH', key, ARGV[i + 1])
  end
end
return #KEYS
"""
"""Celery's Redis store, for many results at once: each result is written and published
unless a SUCCESS is stored under its key already (Celery's guard against a late duplicate
overwriting a success), in one round trip instead of two per result."""


class Replies:
    """A pool process's rpc:// replies (RabbitMQ): a batch's replies are all published,
    then the broker's confirms for them are awaited once.

    Celery publishes each reply and waits for the broker to confirm it before the next
    (`confirm_publish`): a round trip per message, about a fifth of a pool process's time.
    Here the replies go out on a channel of their own in confirm mode, and the batch
    counts as stored once every one of them is confirmed; a refusal or a lost connection
    raises, and the batch's messages are requeued (their keys make the replay a no-op,
    and a reply that arrives twice is harmless). So a reply is still at least once.
    """

    CONFIRM_TIMEOUT = 60.0

    def __init__(self) -> None:
        self.connection: Any = None
        self.channel: Any = None
        self.next_tag = 1  # the broker numbers a confirm-mode channel's messages from 1
        self.unconfirmed: set[int] = set()
        self.refused: set[int] = set()

    def publish(self, app: Celery, messages: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
        """Publish each `(entry, meta)` to its caller's reply queue; return once all are confirmed."""
        try:
            self._publish(app, messages)
        except LOST:  # the connection died since the last batch: once more, on a new one
            self.close()
            self._publish(app, messages)

    def _publish(self, app: Celery, messages: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
        backend = app.backend
        if self.channel is None:
            self.connection = app.connection_for_write()
            self.channel = self.connection.channel()
            # Every confirm is counted, also those py-amqp reads while it publishes.
            self.channel.events["basic_ack"].add(self._confirmed)
            self.channel.events["basic_nack"].add(self._refused)
            self.channel.confirm_select()
            self.next_tag = 1
            # Publish without waiting: the confirms are awaited below, for the whole batch.
            self.channel.basic_publish = self.channel._basic_publish
        producer = Producer(self.channel, exchange=backend.exchange, serializer=backend.serializer,
                            auto_declare=False)
        self.unconfirmed.clear()
        self.refused.clear()
        with _corked(self.connection):
            for entry, meta in messages:
                reply_to, correlation_id = backend.destination_for(entry["id"], Context(**entry))
                if not reply_to:
                    continue
                self.unconfirmed.add(self.next_tag)
                self.next_tag += 1
                producer.publish(meta, routing_key=reply_to, correlation_id=correlation_id,
                                 delivery_mode=backend.delivery_mode, retry=False)
        while self.unconfirmed and not self.refused:
            self.channel.wait([spec.Basic.Ack, spec.Basic.Nack], timeout=self.CONFIRM_TIMEOUT)
        if self.refused:
            raise MessageNacked(f"the broker refused {len(self.refused)} replies")

    def _confirmed(self, tag: int, multiple: bool) -> None:
        if multiple:
            self.unconfirmed.difference_update([t for t in self.unconfirmed if t <= tag])
        else:
            self.unconfirmed.discard(tag)

    def _refused(self, tag: int, multiple: bool) -> None:
        self.refused.update(t for t in self.unconfirmed if t == tag or (multiple and t <= tag))
        self._confirmed(tag, multiple)

    def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                self.connection.close()
        self.connection = self.channel = None


@contextlib.contextmanager
def _corked(connection: Any) -> Iterator[None]:
    """Hold back the socket's sends until the block ends (TCP_CORK, Linux): a batch's
    replies leave in a few packets instead of one per reply, which on loopback cost the
    receiving side's work too, in each send (py-spy: a quarter of a pool process)."""
    sock = getattr(getattr(connection.connection, "transport", None), "sock", None)
    cork = getattr(socket, "TCP_CORK", None)
    if sock is None or cork is None:
        yield
        return
    sock.setsockopt(socket.IPPROTO_TCP, cork, 1)
    try:
        yield
    finally:
        sock.setsockopt(socket.IPPROTO_TCP, cork, 0)


LOST = (OSError, AMQPError, OperationalError)
"""A connection or channel that failed (not a refusal: `MessageNacked` is none of these)."""

_replies = Replies()
"""This pool process's replies (created before the fork, connected after it, on first use)."""


def store_states(app: Celery, states_to_store: list[tuple[dict[str, Any], Any, str]]) -> None:
    """Store a state (and its result) for each `(entry, result, state)`, as Celery's
    `backend.store_result` would: on a Redis backend all in one round trip, on rpc://
    (RabbitMQ) published together and confirmed once, elsewhere one by one. Raises if
    they cannot be stored."""
    backend = app.backend
    if not states_to_store:
        return
    if isinstance(backend, RPCBackend):
        _replies.publish(app, [
            (entry, backend._to_result(entry["id"], state, result, None, Context(**entry)))
            for entry, result, state in states_to_store
        ])
        return
    if not isinstance(backend, RedisBackend):
        for entry, result, state in states_to_store:
            backend.store_result(entry["id"], result, state, request=Context(**entry))
        return
    keys: list[bytes] = []
    values: list[str] = []
    for entry, result, state in states_to_store:
        meta = backend._get_result_meta(result=backend.encode_result(result, state), state=state,
                                        traceback=None, request=Context(**entry))
        meta["task_id"] = entry["id"]
        value = backend.encode(meta)
        if len(value) > backend._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend", state=state, task_id=entry["id"])
        keys.append(backend.get_key_for_task(entry["id"]))
        values.append(value)

    def store() -> None:
        backend.client.eval(STORE_UNLESS_SUCCEEDED, len(keys), *keys, int(backend.expires or 0), *values)

    backend.ensure(store, ())


def run_gathered(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """In a pool process: apply the messages as one batch and store each result.

    Returns, per message, its result envelope, `{"failed": ...}` for one that raised, or
    `{"retried": ...}` for one sent back to the broker with a countdown (`delivery`).
    Raises (so the main process requeues them all) only when a result cannot be stored.

    A reservation whose caller waits until a deadline gets its STARTED state first, before
    the engine checks that deadline: a caller who finds no STARTED once its deadline has
    passed knows that no worker began the operation in time, and that none will apply it
    later. (Ordinary tasks get the same from Celery's `task_track_started`.)
    """
    app = current_app  # the worker's app: the one its tasks are registered on
    began = [entry for entry in entries if (entry["kwargs"] or {}).get("deadline")]
    if began:
        store_states(app, [(entry, {"hostname": entry["hostname"]}, states.STARTED) for entry in began])
    outcomes = app.tasks[entries[0]["task"]].apply_gathered(entries)
    succeeded: list[tuple[dict[str, Any], Any, str]] = []
    results: list[dict[str, Any]] = []
    for entry, outcome in zip(entries, outcomes):
        if isinstance(outcome, Retry):  # sent back to the broker with a countdown (`delivery`)
            app.backend.mark_as_retry(entry["id"], outcome.exc, request=Context(**entry))
            results.append({"retried": repr(outcome.exc)})
        elif isinstance(outcome, BaseException):
            app.backend.mark_as_failure(entry["id"], outcome, request=Context(**entry))
            results.append({"failed": repr(outcome)})
        else:
            succeeded.append((entry, outcome, states.SUCCESS))
            results.append(outcome)
    store_states(app, succeeded)
    return results
