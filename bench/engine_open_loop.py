"""The async engine's latency under an open loop: reserve-and-commit pairs started at a fixed
rate, each timed from its scheduled start; `AsyncCreditService` (the sync engine in its
thread pool) and, where greenlet and asyncpg are installed, the greenlet bridge it replaced
(bench/greenlet_bridge.py), in turns.

    python bench/engine_open_loop.py [--rate 100] [--seconds 5] [--rounds 2]

No HTTP: the engine alone, as the metering middleware drives it, so that the event loop's
stalls show (each round trip on the loop delays every request waiting on it). Needs
PostgreSQL (CREDITWORKER_BENCH_POSTGRES_URL, as bench/run.py). Not part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import greenlet_bridge
from bench.engine_cost import fresh_database
from creditworker import AsyncCreditService, CreditService
from creditworker.storage.migrate import upgrade

USERS = 50


async def open_loop(service: Any, rate: float, seconds: float) -> dict[str, float]:
    async def pair(number: int, due: float) -> float:
        hold = await service.reserve_credits(f"user-{number % USERS}", 10, ttl_seconds=60, metadata={"n": number},
                                             idempotency_key=f"{uuid.uuid4().hex}:reserve")
        await service.commit_reservation(hold.id, 7, idempotency_key=f"{uuid.uuid4().hex}:commit")
        return time.perf_counter() - due

    for number in range(20):  # warm up: connections, compiled statements
        await pair(number, time.perf_counter())
    count = int(rate * seconds)
    start, cpu = time.perf_counter(), time.process_time()
    started = []
    for number in range(count):
        due = start + number / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        started.append(asyncio.ensure_future(pair(number, due)))
    latencies = sorted(await asyncio.gather(*started))
    return {"p50_ms": latencies[count // 2] * 1000, "p99_ms": latencies[int(count * 0.99)] * 1000,
            "max_ms": latencies[-1] * 1000, "cpu_ms": (time.process_time() - cpu) / count * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args()
    with fresh_database() as url:
        sync = CreditService(url)
        upgrade(sync.engine)
        for number in range(USERS):
            sync.add_credits(f"user-{number}", 10**9)
        sync.engine.dispose()
        sides: dict[str, Callable[[], Any]] = {"thread pool": lambda: AsyncCreditService(url)}
        if greenlet_bridge.available():
            sides["greenlet bridge, asyncpg"] = lambda: greenlet_bridge.GreenletBridge(url)
        for round_number in range(options.rounds):
            for name, make in sides.items():
                figures = asyncio.run(_measure(make(), options.rate, options.seconds))
                print(f"round {round_number + 1} {name:>24}: p50 {figures['p50_ms']:.1f} ms, p99 "
                      f"{figures['p99_ms']:.1f} ms, max {figures['max_ms']:.0f} ms, CPU {figures['cpu_ms']:.2f} ms "
                      f"a pair ({options.rate:g} pairs/s for {options.seconds:g} s)", flush=True)


async def _measure(service: Any, rate: float, seconds: float) -> dict[str, float]:
    try:
        return await open_loop(service, rate, seconds)
    finally:
        await service.dispose()


if __name__ == "__main__":
    main()
