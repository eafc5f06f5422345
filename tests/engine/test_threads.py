"""EngineThreads: the hand-off of sync engine calls to threads, for the async engine and the
HTTP adapters. What an executor promised its callers, it must keep: results and errors come
back, context variables go along, at most `size` calls run at once, a cancelled caller does
not cut its call short, and a forked child gets threads of its own."""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import time
from typing import Any

import pytest

from creditworker import CreditService
from creditworker.engine.threads import DEFAULT_SIZE, EngineThreads, engine_threads

REQUEST = contextvars.ContextVar("request", default="none")


def test_results_and_errors_come_back_from_another_thread() -> None:
    threads = EngineThreads(2)

    async def scenario() -> tuple[Any, str]:
        value = await threads.run(lambda: (threading.current_thread().name, 6 * 7))
        with pytest.raises(ZeroDivisionError):
            await threads.run(lambda: 1 / 0)
        return value

    (name, answer) = asyncio.run(scenario())
    assert answer == 42 and name.startswith("creditworker_")
    assert name != threading.current_thread().name
    threads.shutdown()


def test_the_callers_context_variables_go_along() -> None:
    threads = EngineThreads(1)

    async def one(value: str) -> str:
        REQUEST.set(value)
        return await threads.run(REQUEST.get)

    async def scenario() -> list[str]:
        return list(await asyncio.gather(*[one(f"r{i}") for i in range(20)]))

    assert asyncio.run(scenario()) == [f"r{i}" for i in range(20)]
    threads.shutdown()


def test_at_most_size_calls_run_at_once_and_all_of_them_run() -> None:
    threads = EngineThreads(3)
    running = 0
    most = 0
    lock = threading.Lock()

    def call(index: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.01)
        with lock:
            running -= 1
        return index

    async def scenario() -> list[int]:
        return list(await asyncio.gather(*[threads.run(lambda i=i: call(i)) for i in range(30)]))

    assert asyncio.run(scenario()) == list(range(30))
    assert most == 3
    assert len({t.name for t in threading.enumerate() if t.name.startswith("creditworker_")}) >= 3
    threads.shutdown()


def test_a_cancelled_caller_does_not_cut_its_call_short() -> None:
    threads = EngineThreads(1)
    finished = threading.Event()

    def slow() -> str:
        time.sleep(0.2)
        finished.set()
        return "done"

    async def scenario() -> None:
        task = asyncio.ensure_future(threads.run(slow))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not finished.is_set()
        assert await threads.run(lambda: "next") == "next"  # waits behind it: one thread

    asyncio.run(scenario())
    assert finished.is_set()
    threads.shutdown()


def test_a_call_that_outlives_its_loop_is_dropped_quietly() -> None:
    threads = EngineThreads(1)
    release = threading.Event()

    async def start() -> None:
        asyncio.ensure_future(threads.run(release.wait))
        await asyncio.sleep(0.05)

    asyncio.run(start())  # the loop closes with the call still running
    release.set()

    async def again() -> int:
        return await threads.run(lambda: 7)

    assert asyncio.run(again()) == 7  # the thread lived on and serves the next loop
    threads.shutdown()


def test_shutdown_lets_calls_in_flight_end_and_refuses_new_ones() -> None:
    threads = EngineThreads(2)
    results: list[str] = []

    async def scenario() -> None:
        flight = asyncio.ensure_future(threads.run(lambda: (time.sleep(0.1), results.append("ran"))))
        await asyncio.sleep(0.02)
        await asyncio.get_running_loop().run_in_executor(None, threads.shutdown)
        assert results == ["ran"]
        await flight
        with pytest.raises(RuntimeError, match="shut down"):
            await threads.run(lambda: None)

    asyncio.run(scenario())
    assert threads._threads and not any(thread.is_alive() for thread in threads._threads)


def test_a_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        EngineThreads(0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_starts_threads_of_its_own() -> None:
    threads = EngineThreads(1)
    assert asyncio.run(threads.run(lambda: 1)) == 1  # the parent's thread exists now
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        try:
            answer = asyncio.run(asyncio.wait_for(threads.run(lambda: 2), 5))
            os.write(write, str(answer).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    assert os.read(read, 16) == b"2"  # a child with the parent's dead thread would wait for ever
    os.close(read)
    threads.shutdown()


def test_a_sync_engine_gets_as_many_threads_as_its_pool_has_connections(postgres_url: str) -> None:
    service = CreditService(postgres_url)
    pool: Any = service.engine.pool
    assert engine_threads(service).size == pool.size() + pool._max_overflow
    assert engine_threads(service) is engine_threads(service)

    class Poolless:
        pass

    assert engine_threads(Poolless()).size == DEFAULT_SIZE
    assert engine_threads(None) is engine_threads(object())  # shared by what cannot be a key
    assert asyncio.run(engine_threads(None).run(lambda: 3)) == 3
    service.engine.dispose()
