"""The answer transport: how a producer's callers get their tasks' results from a Redis
result backend, through one pattern subscription per process instead of one per task.

Kept apart from the API (sync.py, aio.py) because it is plumbing under Celery's result
backend, with threads and reconnects of its own; tests/e2e/test_producer_answers.py drives
it against a real Redis.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
import uuid
import weakref
from typing import Any

from celery import Celery, states
from celery.backends.redis import RedisBackend
from redis.client import PubSub

logger = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT = 10.0
"""Seconds a first call waits for the pattern subscription to be made."""


class Answer(threading.Event):
    """Set when the final state of one task has arrived; `meta` is that state."""

    meta: dict[str, Any]

    def outcome(self) -> Any:
        """The task's return value, or raise what it failed with (as `AsyncResult.get`)."""
        if self.meta["status"] == states.SUCCESS:
            return self.meta["result"]
        error = self.meta.get("result")
        if isinstance(error, BaseException):
            raise error
        raise RuntimeError(f"task ended {self.meta['status']}: {error!r}")


class Answers:
    """One pattern subscription per producer process carries every answer from a Redis
    result backend; each caller sleeps on its own `Answer` until it is set.

    Celery subscribes to each task's result channel when the task is sent and unsubscribes
    once the answer came: two Redis commands, and their replies, per call (about 15% of a
    producer's CPU). Here this producer's task ids share a prefix of their own, so one
    PSUBSCRIBE to `celery-task-meta-<prefix>*`, made once, delivers exactly this producer's
    answers, and no other producer's. The answer is registered before the message is sent,
    so it cannot arrive unexpected; after a reconnect (redis-py subscribes again by
    itself) the stored results of every call still waiting are read once, so an answer
    published while the connection was down is not lost. Other backends (files, rpc://
    whose replies go to a queue per thread) keep Celery's `get`.
    """

    def __init__(self, app: Celery, subscribe_timeout: float = SUBSCRIBE_TIMEOUT) -> None:
        self.app = app
        self.subscribe_timeout = subscribe_timeout
        self.last_failure: Exception | None = None
        """Why the last subscription failed (named when a call gives up waiting for one)."""
        backend = app.backend
        self.enabled = isinstance(backend, RedisBackend)
        self._lock = threading.Lock()
        self._waiting: weakref.WeakValueDictionary[str, Answer] = weakref.WeakValueDictionary()
        self._pid = -1
        self._reader: threading.Thread | None = None
        self._subscribed = threading.Event()
        self._counter = itertools.count()
        self._prefix = ""
        self.subscription: PubSub | None = None
        """The connection that carries the answers, once subscribed."""
        if self.enabled:
            # Answers come through the pattern subscription: Celery's own subscription per
            # sent task is not wanted (an `AsyncResult.get` still subscribes when called).
            backend.on_task_call = _answered_by_pattern

    def task_id(self) -> str:
        """A new task id. Unique: a random prefix per producer process (74 random bits,
        also what the subscription matches) and a counter; shaped as a UUID."""
        self._check_process()
        return f"{self._prefix}{next(self._counter) % 16**12:012x}"

    def _check_process(self) -> None:
        if self._pid != os.getpid():  # first use, or a forked child: a prefix and reader of its own
            with self._lock:
                if self._pid != os.getpid():
                    self._prefix = str(uuid.uuid4())[:24]
                    self._counter = itertools.count()
                    self._waiting = weakref.WeakValueDictionary()
                    self._reader = None
                    self._subscribed = threading.Event()
                    self._pid = os.getpid()

    def expect(self, task_id: str) -> Answer | None:
        """Register for the answer of `task_id` (from `task_id()`) before it is sent;
        None: this backend has no pattern subscription, use `AsyncResult.get`."""
        if not self.enabled or not task_id.startswith(self._prefix):
            return None
        answer = Answer()
        with self._lock:  # not while `_resync` copies the keys
            self._waiting[task_id] = answer
        self._ensure_reader()
        return answer

    def _ensure_reader(self) -> None:
        if self._reader is None or not self._reader.is_alive():
            with self._lock:
                if self._reader is None or not self._reader.is_alive():
                    self._subscribed.clear()
                    self._reader = threading.Thread(
                        target=self._read, name="creditworker-answers", daemon=True
                    )
                    self._reader.start()
        if not self._subscribed.wait(self.subscribe_timeout):
            from kombu.utils.url import maybe_sanitize_url

            where = maybe_sanitize_url(self.app.conf.result_backend or "")
            why = f" ({self.last_failure})" if self.last_failure else ""
            raise RuntimeError(f"cannot reach the Redis result backend {where} within "
                               f"{self.subscribe_timeout:g} s{why}")

    def _read(self) -> None:
        backend = self.app.backend
        first_key = backend.get_key_for_task(self._prefix)  # the keys' prefix, then ours
        skip = len(first_key) - len(self._prefix)
        pattern = first_key + b"*"
        resync = threading.Event()
        failures = 0
        while True:
            pubsub = self.subscription = _Subscription(backend.client.connection_pool, resync)
            try:
                pubsub.psubscribe(pattern)
                failures = 0
                while True:
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        pass
                    elif message["type"] == "pmessage":
                        self._deliver(message["channel"][skip:].decode(), message["data"])
                    elif message["type"] == "psubscribe":
                        self.last_failure = None
                        self._subscribed.set()
                    if resync.is_set():
                        resync.clear()
                        self._resync()
            except Exception as exc:  # noqa: BLE001 (subscribe again below; every waiting call is re-read)
                log = logger.warning if failures == 0 else logger.debug  # once per outage
                log("reading task results failed (%r); subscribing again", exc)
                self.last_failure = exc
                resync.set()
                failures += 1
                time.sleep(min(5.0, 0.25 * 2**failures))
            finally:
                with contextlib.suppress(Exception):  # a dead connection: nothing to close
                    pubsub.close()

    def _deliver(self, task_id: str, data: bytes) -> None:
        answer = self._waiting.get(task_id)
        if answer is None:
            return
        meta = self.app.backend.decode_result(data)
        if meta.get("status") in states.READY_STATES:
            answer.meta = meta
            answer.set()
            self._waiting.pop(task_id, None)

    def _resync(self) -> None:
        """Deliver the stored results of every call still waiting (published, perhaps,
        while the subscription was down)."""
        with self._lock:
            waiting = list(self._waiting.keys())
        backend = self.app.backend
        for start in range(0, len(waiting), 500):
            ids = waiting[start:start + 500]
            stored = backend.client.mget([backend.get_key_for_task(i) for i in ids])
            for task_id, data in zip(ids, stored):
                if data is not None:
                    self._deliver(task_id, data)


class _Subscription(PubSub):  # type: ignore[misc]
    """redis-py's PubSub, which subscribes again on a new connection; and then says so,
    for the answers that were published while there was none."""

    def __init__(self, pool: Any, reconnected: threading.Event) -> None:
        super().__init__(pool)
        self.reconnected = reconnected

    def on_connect(self, connection: Any) -> None:
        super().on_connect(connection)
        self.reconnected.set()


def _answered_by_pattern(_producer: Any, _task_id: str) -> None:
    """`RedisBackend.on_task_call` for a producer whose answers come through `Answers`."""


