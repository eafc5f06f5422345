"""EngineThreads: how awaiting code hands a call of the sync engine to a thread.

The async engine and the HTTP adapters run the sync engine in threads, so that neither its
CPU nor its round trips to the database stall an event loop. A metered request makes two
such calls: behind the middleware, with anyio's hand-off, they were a quarter of the sync
engine's own instructions. Counted with callgrind (a call that does nothing, awaited 300
times one after the other): `loop.run_in_executor` on a `ThreadPoolExecutor` 168,000
instructions a call, Starlette's `run_in_threadpool` (anyio) 278,000, this pool 67,000. It
keeps what the call needs and no more: one queue, threads started as calls need them (up to
`size`), and one callback on the loop with the result, where the executor makes a
`concurrent.futures.Future` (with its `Condition`), chains it to an asyncio future through
two callbacks and counts idle threads with a pure-Python semaphore.

A call whose awaiting task is cancelled runs to its end in its thread (a transaction is not
cut in the middle); its result is dropped.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import weakref
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_SIZE = 40
"""Threads for an engine object without a connection pool (anyio's default limit)."""

_Call = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", contextvars.Context, Callable[[], Any]]


class EngineThreads:
    """Up to `size` threads that run calls for awaiting code, each with its caller's context
    variables. Threads start when calls need them and stop at `shutdown()`."""

    def __init__(self, size: int, name: str = "creditworker") -> None:
        if size < 1:
            raise ValueError(f"size is at least 1, not {size}")
        self.size = size
        self.name = name
        self._closed = False
        self._forget_threads()
        _EVERY.add(self)

    def _forget_threads(self) -> None:
        """No threads yet (also in a forked child, which has none of its parent's)."""
        self._calls: SimpleQueue[_Call | None] = SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()

    async def run(self, call: Callable[[], T]) -> T:
        """`call()` in one of the threads, awaited."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name}: the engine's threads were shut down")
            self._calls.put((loop, future, contextvars.copy_context(), call))
            if self._idle:
                self._idle -= 1  # that thread takes it
            elif len(self._threads) < self.size:
                thread = threading.Thread(target=self._work, name=f"{self.name}_{len(self._threads)}",
                                          daemon=True)
                thread.start()
                self._threads.append(thread)
        return await future

    def shutdown(self) -> None:
        """Stop taking calls, let the calls in flight end, and stop the threads."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._calls.put(None)
        for thread in threads:
            thread.join()

    def _work(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            loop, future, context, call = item
            try:
                result = context.run(call)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task, as an executor does
                _deliver(loop, _fail, future, exc)
            else:
                _deliver(loop, _succeed, future, result)
            del item, loop, future, context, call
            with self._lock:
                self._idle += 1


def _deliver(loop: asyncio.AbstractEventLoop, outcome: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(outcome, *args)
    except RuntimeError:
        pass  # the loop was closed while the call ran: nobody awaits it any more


def _succeed(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():  # not cancelled while the call ran
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


_EVERY: weakref.WeakSet[EngineThreads] = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [threads._forget_threads() for threads in list(_EVERY)])

_OF_SERVICE: weakref.WeakKeyDictionary[Any, EngineThreads] = weakref.WeakKeyDictionary()


def engine_threads(service: Any) -> EngineThreads:
    """The threads that run the calls of `service` (a sync engine object) for awaiting code:
    made once per object, as many as its engine's connection pool has connections, so a call
    never waits in a thread for a connection. What has no pool (or cannot be weakly
    referenced: a plain function's missing `__self__`) shares threads of `DEFAULT_SIZE`."""
    try:
        threads = _OF_SERVICE.get(service)
    except TypeError:
        service = _Shared
        threads = _OF_SERVICE.get(service)
    if threads is None:
        pool: Any = getattr(getattr(service, "engine", None), "pool", None)
        size = DEFAULT_SIZE
        if pool is not None and callable(getattr(pool, "size", None)):
            # The pool's overflow is named only privately.
            size = max(1, int(pool.size()) + max(0, int(getattr(pool, "_max_overflow", 0))))
        threads = _OF_SERVICE.setdefault(service, EngineThreads(size))
    return threads


class _Shared:
    """The key of the threads shared by what cannot be a key itself."""
