"""creditworker benchmarks: rates, and ratios against baselines measured in the same run.

    python bench/run.py [--quick] [--json PATH]

Needs PostgreSQL (CREDITWORKER_BENCH_POSTGRES_URL, default the local server) and a
`redis-server` on PATH. Each run creates a database of its own and drops it, starts a
private Redis (or uses the one CREDITWORKER_BENCH_REDIS_URL names, and empties that
database), and starts its own worker (the command line of `creditworker up`), all through
the tests' harness (tests/harness.py). Machines are noisy, so every figure that is compared
is compared with a baseline taken in the same run, never with a number from another day.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import redis
from celery import Celery
from kombu import Connection
from rich.console import Console
from rich.table import Table
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from plain_celery import QUEUE as PLAIN_QUEUE

from creditworker.contract.operations import DEDUCT, PING
from creditworker.engine import CreditService, SubscriptionService
from creditworker.records.audit import audit
from creditworker.storage.database import make_engine
from creditworker.storage.migrate import upgrade
from tests import harness
from tests.harness import RunningWorker

POSTGRES = os.environ.get(
    "CREDITWORKER_BENCH_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)
REDIS_GIVEN = os.environ.get("CREDITWORKER_BENCH_REDIS_URL") or None
RABBITMQ = os.environ.get("CREDITWORKER_BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
BENCH_DIR = Path(__file__).resolve().parent

SIZES = {
    "quick": {"single": 5000, "batch_ops": 5000, "worker_batch_ops": 5000, "reserve_seconds": 5,
              "ledger": 100_000, "lots": 5000, "subscriptions": 2000, "memory_ops": 10_000,
              "hot_batches": 20},
    "full": {"single": 5000, "batch_ops": 200_000, "worker_batch_ops": 200_000,
             "reserve_seconds": 20, "ledger": 10_000_000, "lots": 1_000_000,
             "subscriptions": 100_000, "memory_ops": 1_000_000, "hot_batches": 100},
}

console = Console()
R = TypeVar("R")


# ---------------------------------------------------------------- infrastructure


@contextmanager
def fresh_database() -> Iterator[str]:
    """A database of this run's own on the bench PostgreSQL server, dropped at the end."""
    with harness.fresh_database(POSTGRES, prefix="cw_bench") as url:
        yield url


@contextmanager
def bench_redis(workdir: Path) -> Iterator[str]:
    """The Redis the benchmarks may empty: the one CREDITWORKER_BENCH_REDIS_URL names, or a
    private redis-server (no persistence, like the server the published figures used), so a
    developer's own Redis is never touched."""
    if REDIS_GIVEN is not None:
        redis.Redis.from_url(REDIS_GIVEN).flushdb()
        yield REDIS_GIVEN
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("bench: no redis-server on PATH (or set CREDITWORKER_BENCH_REDIS_URL)")
    port = harness.free_port()
    server = harness.start_redis_server(binary, port, str(workdir))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(30)


def start_worker(database_url: str, broker_url: str, workdir: Path,
                 name: str = "worker") -> RunningWorker:
    """A real `celery worker` with the command line of `creditworker up` (prefork,
    concurrency 2) on the bench database and `broker_url`, started as the tests start
    theirs (tests/harness.py), under a node name of its own: control commands go to it
    alone."""
    env = harness.worker_env(workdir, database_url, broker_url,
                             CREDITWORKER_LEDGER_PATH=str(workdir / f"{name}-ledger.jsonl"))
    worker = RunningWorker(env, workdir, make_engine(database_url), workdir / f"{name}.log",
                           hostname=f"{name}-{os.getpid()}@bench", stop_timeout=60)
    worker.start(timeout=90)
    return worker


def rss_mib(worker: RunningWorker) -> float:
    """Resident memory of the worker's processes (main and pool), in MiB."""
    assert worker.process is not None
    total = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            pid = int(status.parent.name)
            if os.getpgid(pid) != worker.process.pid:
                continue
            for line in status.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError, ProcessLookupError):
            continue
    return total / 1024


def timed(work: Callable[[], Any]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def timed_result(work: Callable[[], R]) -> tuple[float, R]:
    """Seconds `work` took, and what it returned."""
    start = time.perf_counter()
    value = work()
    return time.perf_counter() - start, value


def wait_all(handles: list[Any], timeout: float = 600) -> None:
    for handle in handles:
        handle.get(timeout=timeout)


# ---------------------------------------------------------------- benchmarks


class QueueDepth:
    """Messages on a queue that no task has finished with: waiting, plus (Redis) delivered
    and not yet acknowledged. On RabbitMQ only the waiting ones are counted (AMQP does not
    say how many are unacknowledged), at most the prefetch (8 for plain Celery) too few."""

    def __init__(self, broker_url: str, queue: str) -> None:
        self.queue = queue
        self.redis = redis.Redis.from_url(broker_url) if broker_url.startswith("redis") else None
        self.connection = None if self.redis else Connection(broker_url)

    def __call__(self) -> int:
        if self.redis is not None:
            pipe = self.redis.pipeline()
            pipe.llen(self.queue)
            pipe.hlen("unacked")
            waiting, unacked = pipe.execute()
            return int(waiting) + int(unacked)
        assert self.connection is not None
        try:
            channel = self.connection.default_channel
            _name, count, _consumers = channel.queue_declare(self.queue, passive=True)
        except Exception:  # noqa: BLE001 (not declared yet: nothing waits on it)
            self.connection.close()
            self.connection = Connection(self.connection.as_uri(include_password=True))
            return 0
        return int(count)

    def purge(self) -> None:
        if self.redis is not None:
            self.redis.delete(self.queue, "unacked", "unacked_index")
        else:
            assert self.connection is not None
            try:
                self.connection.default_channel.queue_purge(self.queue)
            except Exception:  # noqa: BLE001 (not declared yet)
                self.connection.close()
                self.connection = Connection(self.connection.as_uri(include_password=True))

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()


def rabbitmq_reachable(url: str) -> bool:
    try:
        with Connection(url, connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1)
        return True
    except Exception:  # noqa: BLE001 (any failure: not reachable)
        return False


def wait_until(condition: Callable[[], bool], timeout: float = 600, every: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the benchmark waited too long")
        time.sleep(every)


def drain_rate(app: Celery, hostname: str, queue: str, depth: QueueDepth, n: int,
               send: Callable[[int], Any], done: Callable[[], bool]) -> float:
    """Messages per second the worker `hostname` drains from a queue pre-filled with `n`.

    The worker is running and warm; it stops consuming `queue` while the queue is filled,
    and the clock runs from the moment it consumes again until `done()`. The rate counts
    the messages that were on the queue when the clock started (a message or two the
    worker had taken before it stopped consuming are not counted, nor timed)."""
    app.control.cancel_consumer(queue, destination=[hostname], reply=True, timeout=10)
    for i in range(n):
        send(i)
    filled = -1
    while filled != (filled := depth()):  # until publishing has settled
        time.sleep(0.3)
    if filled < n * 0.99:
        raise RuntimeError(f"only {filled} of {n} messages reached the queue {queue}")
    start = time.perf_counter()
    app.control.add_consumer(queue, destination=[hostname], reply=True, timeout=10)
    wait_until(done)
    return min(filled, n) / (time.perf_counter() - start)


def plain_floor(
    broker_url: str, workdir: Path, n: int, label: str
) -> tuple[Callable[[], float], Callable[[], None]]:
    """A plain Celery worker (bench/plain_celery.py) on `broker_url`: a function that
    measures its drain rate, and one that stops it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITWORKER_")}
    env.update(PLAIN_CELERY_BROKER_URL=broker_url, C_FORCE_ROOT="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")])))
    app = Celery("plain_celery_sender", broker=broker_url)  # sends by name, like a producer
    app.conf.task_default_queue = PLAIN_QUEUE
    depth = QueueDepth(broker_url, PLAIN_QUEUE)
    depth.purge()
    hostname = f"plain-{label}-{os.getpid()}@bench"
    log_path = workdir / f"plain-{label}.log"
    process = harness.launch(
        ["celery", "-A", "plain_celery", "worker", "--pool=prefork", "--concurrency=2",
         "--loglevel=INFO", f"--hostname={hostname}"], env, workdir, log_path,
    )
    try:
        harness.wait_until_answers(process, app, log_path, hostname=hostname, timeout=90)
    except RuntimeError:
        harness.stop_group(process, signal.SIGKILL)
        raise

    def measure() -> float:
        return drain_rate(app, hostname, PLAIN_QUEUE, depth, n,
                          lambda _i: app.send_task("plain.noop"), lambda: depth() == 0)

    def stop() -> None:
        harness.stop_group(process, timeout=60)
        depth.close()

    for _ in range(200):  # warm up the pool
        app.send_task("plain.noop")
    wait_until(lambda: depth() == 0)
    return measure, stop


def single_operations(worker: RunningWorker, service: CreditService, database_url: str,
                      workdir: Path, brokers: dict[str, str], n: int) -> dict[str, float]:
    """Single deducts against Celery's own floor, on each broker: a plain Celery app with
    one no-op task (bench/plain_celery.py) drains a pre-filled queue of `n` messages, then
    a worker started with the command line of `creditworker up` drains `n` pre-filled
    deducts, then the plain app again (the machine drifts: the floor is the mean of the
    two). Second row, on Redis: deducts sent by the producer and awaited, against the same
    floor."""
    figures: dict[str, float] = {}
    users = [f"single-{i}" for i in range(16)]
    for user in users:
        service.add_credits(user, 10**9)
    engine = make_engine(database_url)

    def applied(prefix: str) -> int:
        with engine.connect() as connection:
            return int(connection.scalar(
                text("SELECT count(*) FROM operations WHERE idempotency_key LIKE :p"),
                {"p": prefix + "%"}))

    for broker, url in brokers.items():
        plain_url = harness.redis_db(url, 1) if broker == "redis" else url  # a database of its own
        measure_plain, stop_plain = plain_floor(plain_url, workdir, n, broker)
        try:
            plain_before = measure_plain()
        finally:
            stop_plain()
        drain_worker = worker if broker == "redis" else start_worker(
            database_url, url, workdir, name=f"worker-{broker}")
        try:
            app = drain_worker.client.app
            depth = QueueDepth(url, "celery")
            prefix = f"drain-{broker}:"

            def send(i: int, prefix: str = prefix, app: Celery = app) -> None:
                app.send_task(DEDUCT.task, kwargs={"user_id": users[i % len(users)], "amount": 1,
                                                   "idempotency_key": f"{prefix}{i}"})

            warm = f"warm-{broker}:"
            for i in range(200):
                send(i, prefix=warm)

            def settled(depth: QueueDepth = depth, prefix: str = prefix, count: int = n) -> bool:
                return depth() == 0 and applied(prefix) == count

            wait_until(lambda: settled(prefix=warm, count=200), every=0.05)  # noqa: B023 (called at once)
            deducts = drain_rate(app, drain_worker.hostname, "celery", depth, n, send, settled)
            depth.close()
        finally:
            if drain_worker is not worker:
                drain_worker.stop()
        measure_plain, stop_plain = plain_floor(plain_url, workdir, n, broker)
        try:
            plain_after = measure_plain()
        finally:
            stop_plain()
        floor = (plain_before + plain_after) / 2
        figures.update({
            f"{broker}_plain_celery_noop_per_s": floor,
            f"{broker}_plain_celery_noop_before_per_s": plain_before,
            f"{broker}_plain_celery_noop_after_per_s": plain_after,
            f"{broker}_drained_deducts_per_s": deducts,
            f"{broker}_single_op_ratio": deducts / floor,
        })
        console.print(f"  {broker}: plain Celery {plain_before:,.0f} and {plain_after:,.0f}/s, "
                      f"creditworker deducts {deducts:,.0f}/s: {deducts / floor:.2f} of the floor")

    def deducts_awaited(count: int) -> None:
        wait_all([worker.client.deduct_credits(users[i % len(users)], 1) for i in range(count)])

    deducts_awaited(200)
    awaited = n / timed(lambda: deducts_awaited(n))
    figures["redis_awaited_deducts_per_s"] = awaited
    figures["redis_awaited_vs_plain_ratio"] = awaited / figures["redis_plain_celery_noop_per_s"]
    figures["single_op_ratio"] = figures["redis_single_op_ratio"]
    engine.dispose()
    return figures


def batches_in_process(
    database_url: str, total: int, size: int = 100, mixed: bool = False
) -> dict[str, float]:
    """apply_batch on PostgreSQL against raw SQL doing the same balance updates: one
    statement per row (executemany, the baseline of the ratio), and one statement per
    batch (PostgreSQL's own ceiling, which no per-row ledger can reach).

    `mixed`: each batch is a fifth each of adds, deducts, reserves, and commits and
    releases of the previous batch's reservations (the first batch only reserves)."""
    engine = make_engine(database_url)
    accounts = 100
    label = f"{'mixed_' if mixed else ''}batch{size}"
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS bench_raw"))
        connection.execute(text("CREATE TABLE bench_raw (id int primary key, balance bigint)"))
        connection.execute(text("INSERT INTO bench_raw SELECT g, 1000000000"
                                f" FROM generate_series(0, {accounts - 1}) g"))
    raw = engine.raw_connection()

    def raw_batches() -> None:
        cursor = raw.cursor()
        for start in range(0, total, size):
            cursor.executemany(
                "UPDATE bench_raw SET balance = balance - 1 WHERE id = %s",
                [((start + i) % accounts,) for i in range(size)],
            )
            raw.commit()

    raw_rate = total / timed(raw_batches)

    def one_statement_batches() -> None:  # PostgreSQL's own ceiling: a batch is one UPDATE
        cursor = raw.cursor()
        for start in range(0, total, size):
            cursor.execute(
                "UPDATE bench_raw SET balance = balance - 1 WHERE id = ANY(%s)",
                ([(start + i) % accounts for i in range(size)],),
            )
            raw.commit()

    one_statement_rate = total / timed(one_statement_batches)
    raw.close()
    service = CreditService(engine)
    users = [f"{label}-{i}" for i in range(accounts)]
    service.apply_batch([{"op": "add", "user_id": u, "amount": 10**9} for u in users])
    held: list[str] = []

    def item(n: int) -> dict[str, Any]:
        user, key = users[n % accounts], f"{label}:{n}"
        kind = ("add", "deduct", "reserve", "settle", "settle")[n % 5] if mixed else "deduct"
        if kind == "settle" and held:
            hold = held.pop()
            if n % 2:
                return {"op": "commit", "reservation_id": hold, "amount": 1, "idempotency_key": key}
            return {"op": "release", "reservation_id": hold, "idempotency_key": key}
        if kind in ("settle", "reserve"):
            return {"op": "reserve", "user_id": user, "amount": 2, "idempotency_key": key}
        return {"op": kind, "user_id": user, "amount": 1, "idempotency_key": key}

    def engine_batches() -> None:
        for start in range(0, total, size):
            outcomes = service.apply_batch([item(start + i) for i in range(size)])
            assert all(outcome.ok for outcome in outcomes)
            held.extend(o.result["id"] for o in outcomes if o.result and "status" in o.result
                        and o.result["status"] == "active")

    engine_rate = total / timed(engine_batches)
    passed = audit(engine).passed
    with engine.connect() as connection:
        applied = connection.scalar(text(
            f"SELECT count(*) FROM operations WHERE idempotency_key LIKE '{label}:%'"))
    engine.dispose()
    return {f"{label}_raw_sql_updates_per_s": raw_rate,
            f"{label}_raw_sql_one_statement_updates_per_s": one_statement_rate,
            f"{label}_ops_per_s": engine_rate, f"{label}_vs_raw_ratio": engine_rate / raw_rate,
            f"{label}_vs_one_statement_ratio": engine_rate / one_statement_rate,
            f"{label}_checks_passed": float(passed and applied == total)}


def batches_through_worker(
    worker: RunningWorker, service: CreditService, total: int, size: int = 1000
) -> dict[str, float]:
    users = [f"wbatch-{i}" for i in range(100)]
    service.apply_batch([{"op": "add", "user_id": u, "amount": 10**9} for u in users])

    def run() -> None:
        handles = [
            worker.client.submit_batch([
                {"op": "deduct", "user_id": users[(start + i) % len(users)], "amount": 1,
                 "idempotency_key": f"wb:{start + i}"}
                for i in range(min(size, total - start))
            ])
            for start in range(0, total, size)
        ]
        for handle in handles:
            assert all(outcome.ok for outcome in handle.get(timeout=600))

    return {"worker_batch_ops_per_s": total / timed(run)}


def at_fixed_rate(call: Callable[[int], Any], seconds: float, rate: float) -> dict[str, Any]:
    """Round trips of `call(i)` started at a fixed rate, each in a thread of its own started
    at its due time (as independent callers would); latencies are measured from the time
    each was due, so a slow answer cannot hide the ones queued behind it. Also returns how
    late the threads started (the harness's own delay) and the CPU this process used."""
    latencies: list[float] = []
    lateness: list[float] = []
    lock = threading.Lock()
    start = time.perf_counter() + 0.1
    cpu_before = os.times()

    def one(i: int, due: float) -> None:
        began = time.perf_counter()
        call(i)
        with lock:
            latencies.append(time.perf_counter() - due)
            lateness.append(began - due)

    threads = []
    for i in range(int(seconds * rate)):
        due = start + i / rate
        time.sleep(max(0.0, due - time.perf_counter()))
        thread = threading.Thread(target=one, args=(i, due), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    cpu_after = os.times()
    cpu = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    return {"latencies": sorted(latencies), "lateness": sorted(lateness), "cpu_s": cpu,
            "calls": len(threads)}


def percentile_ms(latencies: list[float], fraction: float) -> float:
    rank = int(len(latencies) * fraction + 0.5) - 1
    return 1000 * latencies[min(len(latencies) - 1, max(0, rank))]


def p99_ms(latencies: list[float]) -> float:
    return percentile_ms(latencies, 0.99)


RESERVE_RATES = (50, 100, 200, 400)


def reserve_latency(
    worker: RunningWorker, service: CreditService, seconds: float,
    rates: tuple[int, ...] = RESERVE_RATES, plot: Path | None = None,
) -> dict[str, float]:
    """Reserve round trips (producer call to answer) at fixed rates, against no-op round
    trips (`creditworker.health.ping`, sent and awaited through the same producer path) at
    the same rates; and the producer's CPU per call, against the harness alone."""
    users = [f"reserve-{i}" for i in range(16)]
    for user in users:
        service.add_credits(user, 10**9)
    client = worker.client
    app = client.app
    depth = QueueDepth(str(app.conf.broker_url), "celery")

    def noop(_i: int) -> None:  # the producer's own answer path, without a credit operation
        task_id = client._answers.task_id()
        expected = client._answers.expect(task_id)
        sent = app.send_task(PING.task, task_id=task_id)
        if expected is None:
            sent.get(timeout=600)
        elif not expected.wait(600):
            raise TimeoutError(task_id)

    def reserve(i: int) -> None:
        client.reserve_credits(users[i % len(users)], 1, ttl_seconds=60, timeout=600)

    for i in range(100):  # warm up
        reserve(i)
        noop(i)
    load = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    idle = at_fixed_rate(lambda _i: None, min(seconds, 5), 200)  # the harness alone
    figures: dict[str, float] = {"harness_cpu_ms_per_call": 1000 * idle["cpu_s"] / idle["calls"],
                                 "reserve_step_load_average": load}
    rows: dict[str, dict[int, tuple[float, float]]] = {"no-op": {}, "reserve": {}}
    for rate in rates:
        for label, call in (("noop", noop), ("reserve", reserve)):
            wait_until(lambda: depth() == 0, every=0.1)  # nothing left from the step before
            time.sleep(1.0)
            run = at_fixed_rate(call, seconds, rate)
            latencies = run["latencies"]
            p50, p99 = percentile_ms(latencies, 0.5), p99_ms(latencies)
            rows["no-op" if label == "noop" else "reserve"][rate] = (p50, p99)
            figures[f"{label}_p50_ms_at_{rate}"] = p50
            figures[f"{label}_p99_ms_at_{rate}"] = p99
            figures[f"{label}_harness_late_p99_ms_at_{rate}"] = p99_ms(run["lateness"])
            figures[f"{label}_producer_cpu_ms_per_call_at_{rate}"] = (
                1000 * run["cpu_s"] / run["calls"] - figures["harness_cpu_ms_per_call"])
            producer_cpu = figures[f"{label}_producer_cpu_ms_per_call_at_{rate}"]
            console.print(f"  {label} at {rate}/s: p50 {p50:,.1f} ms, p99 {p99:,.1f} ms "
                          f"(threads started late by p99 {p99_ms(run['lateness']):,.1f} ms; "
                          f"producer CPU {producer_cpu:.2f} ms a call)")
    depth.close()
    if 200 in rates:
        figures["reserve_p99_ms"] = figures["reserve_p99_ms_at_200"]
        figures["reserve_vs_noop_p99_ratio"] = (
            figures["reserve_p99_ms_at_200"] / figures["noop_p99_ms_at_200"])
    if plot is not None:
        plot_latency(rows, plot, seconds, load)
    return figures


def plot_latency(rows: dict[str, dict[int, tuple[float, float]]], path: Path, seconds: float,
                 load: float) -> None:
    """p50 and p99 against the rate, for each kind of round trip (the `bench` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("  no plot: matplotlib is missing (pip install 'creditworker[bench]')")
        return
    figure, axis = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, color in (("reserve", "tab:blue"), ("no-op", "tab:gray")):
        rates = sorted(rows[label])
        axis.plot(rates, [rows[label][r][1] for r in rates], "o-", color=color,
                  label=f"{label} p99")
        axis.plot(rates, [rows[label][r][0] for r in rates], "o--", color=color,
                  label=f"{label} p50")
    axis.axhline(20, color="tab:red", linewidth=0.8, linestyle=":",
                 label="target: p99 20 ms at 200/s")
    axis.set_xscale("log", base=2)
    axis.set_xticks(sorted(rows["reserve"]), [str(r) for r in sorted(rows["reserve"])])
    axis.set_yscale("log")
    axis.set_xlabel("round trips started per second (fixed rate, a thread per call)")
    axis.set_ylabel("producer call to answer (ms)")
    axis.set_title(f"Reserve round trip, {seconds:g} s per rate: producer, Redis, worker "
                   f"(prefork 2)\nand PostgreSQL on the same {os.cpu_count()} cores "
                   f"(load average {load:.1f} before)", fontsize=9)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    console.print(f"  plot: {path}")


def balance_with_big_ledger(database_url: str, entries: int) -> dict[str, float]:
    """The balance read with `entries` ledger rows against one with 1,000: it reads the
    account row and the unexpired lots, never the ledger."""
    engine = make_engine(database_url)
    service = CreditService(engine)

    def read_ms(user: str) -> float:
        for _ in range(20):
            service.get_user_credits_info(user)
        samples = [timed(lambda: service.get_user_credits_info(user)) for _ in range(300)]
        return 1000 * statistics.median(samples)

    figures = {}
    for label, count in (("small", 1000), ("big", entries)):
        user = f"ledger-{label}"
        service.add_credits(user, 10**9)
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO ledger_entries (user_id, kind, amount, held, balance_after,"
                " reserved_after, idempotency_key, created_at)"
                " SELECT :user, 'deduct', -1, 0, 0, 0, 'fill:' || :user || g, now()"
                " FROM generate_series(1, :n) g"), {"user": user, "n": count})
        figures[label] = read_ms(user)
    engine.dispose()
    return {"ledger_entries": float(entries), "balance_ms_1k_entries": figures["small"],
            "balance_ms_big_ledger": figures["big"],
            "balance_big_vs_small_ratio": figures["big"] / figures["small"]}


def expiry(database_url: str, lots: int) -> dict[str, float]:
    """Expiry of `lots` lots, and of ten times fewer, to show how it grows."""
    figures: dict[str, float] = {}
    engine = make_engine(database_url)
    for label, count in (("tenth", lots // 10), ("full", lots)):
        prefix = f"exp-{label}-"
        at = datetime.now(UTC)  # each phase's own clock: the lots expired a minute before it
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO accounts (user_id, balance, reserved, low_credit_alerted, created_at,"
                " updated_at) SELECT :p || g, 10 * (:n / 1000 + 1), 0, false, now(), now()"
                " FROM generate_series(0, 999) g"),
                {"p": prefix, "n": count})
            connection.execute(text(
                "INSERT INTO credit_lots (user_id, amount, remaining, source, priority, expires_at,"
                " created_at, idempotency_key)"
                " SELECT :p || (g % 1000), 10, 10, 'purchase', 0, :expired, now(),"
                " 'lot:' || :p || g"
                " FROM generate_series(0, :n - 1) g"),
                {"p": prefix, "n": count,
                 "expired": (at - timedelta(minutes=1)).replace(tzinfo=None)})
            connection.execute(text(  # keep lots and balances consistent: top up the rest
                "INSERT INTO credit_lots (user_id, amount, remaining, source, priority, created_at,"
                " idempotency_key)"
                " SELECT a.user_id, a.balance - coalesce(l.s, 0), a.balance - coalesce(l.s, 0),"
                " 'purchase', 0, now(), 'fill:' || a.user_id"
                " FROM accounts a LEFT JOIN"
                " (SELECT user_id, sum(remaining) s FROM credit_lots GROUP BY user_id) l"
                " ON l.user_id = a.user_id"
                " WHERE a.user_id LIKE :p || '%' AND a.balance > coalesce(l.s, 0)"),
                {"p": prefix})
        service = CreditService(engine)
        expire = partial(service.expire_credits, now=at)
        figures[f"expire_{label}_s"], expired = timed_result(expire)
        assert expired == count, (expired, count)
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM credit_lots WHERE remaining = 0"))
    figures["expire_lots"] = float(lots)
    figures["expire_growth_10x"] = figures["expire_full_s"] / figures["expire_tenth_s"]
    engine.dispose()
    return figures


def allocation(database_url: str, subscriptions: int) -> dict[str, float]:
    """Allocation of `subscriptions` due subscriptions, and of ten times fewer."""
    figures: dict[str, float] = {}
    engine = make_engine(database_url)
    subs = SubscriptionService(CreditService(engine))
    for label, count in (("tenth", subscriptions // 10), ("full", subscriptions)):
        at = datetime.now(UTC)
        plan = subs.create_plan(f"bench-{label}", 10, billing_period="daily")
        anchor = at - timedelta(days=1, minutes=5)
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO accounts (user_id, balance, reserved, low_credit_alerted, created_at,"
                " updated_at) SELECT 'sub-' || :l || g, 0, 0, false, now(), now()"
                " FROM generate_series(0, :n - 1) g"),
                {"l": label, "n": count})
            connection.execute(text(
                "INSERT INTO subscriptions (user_id, plan_id, status, anchor_at, period_index,"
                " current_period_start, current_period_end, cancel_at_period_end, created_at,"
                " updated_at) SELECT 'sub-' || :l || g, :plan, 'active', :anchor, 0, :anchor,"
                " :end, false, now(), now()"
                " FROM generate_series(0, :n - 1) g"),
                {"l": label, "n": count, "plan": plan.id, "anchor": anchor.replace(tzinfo=None),
                 "end": (anchor + timedelta(days=1)).replace(tzinfo=None)})
        figures[f"allocate_{label}_s"], granted = timed_result(partial(subs.allocate_due, now=at))
        assert granted == count, (granted, count)
    figures["allocate_subscriptions"] = float(subscriptions)
    figures["allocate_growth_10x"] = figures["allocate_full_s"] / figures["allocate_tenth_s"]
    engine.dispose()
    return figures


def _hot_account_process(database_url: str, user: str, process: int, batches: int, size: int,
                         start: Any, results: Any) -> None:
    """One of the hot-account step's processes: its batches of deducts on the one account."""
    service = CreditService(make_engine(database_url))
    service.get_user_credits_info(user)  # connected before the clock starts
    refused = errors = 0
    start.wait()
    for batch in range(batches):
        try:
            outcomes = service.apply_batch([
                {"op": "deduct", "user_id": user, "amount": 1,
                 "idempotency_key": f"hot:{process}:{batch}:{i}"}
                for i in range(size)
            ])
            refused += sum(not outcome.ok for outcome in outcomes)
        except Exception:  # noqa: BLE001 - a deadlock or any other failure is what this step counts
            errors += 1
    results.put((refused, errors, time.time()))
    service.engine.dispose()


def hot_account(
    database_url: str, batches: int, processes: int = 4, size: int = 100
) -> dict[str, float]:
    """`processes` processes, each applying `batches` batches of `size` deducts to one
    account at once: they serialise on its row lock; none may deadlock or fail. The time
    runs from the start signal to the last process's last batch. It runs before the steps
    that write rows behind the engine's back (expiry, allocation), so the audit is whole."""
    import multiprocessing

    engine = make_engine(database_url)
    user = "hot-account"
    CreditService(engine).add_credits(user, processes * batches * size)
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    workers = [context.Process(target=_hot_account_process,
                               args=(database_url, user, n, batches, size, start, results))
               for n in range(processes)]
    for worker in workers:
        worker.start()
    time.sleep(2)  # every process imported and connected before the clock starts

    started = time.time()
    start.set()
    outcomes = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join(60)
    elapsed = max(finished for _, _, finished in outcomes) - started
    balance = CreditService(engine).get_user_credits_info(user).total
    passed = audit(engine).passed
    engine.dispose()
    total = processes * batches * size
    return {"hot_account_ops": float(total), "hot_account_ops_per_s": total / elapsed,
            "hot_account_refused": float(sum(refused for refused, _, _ in outcomes)),
            "hot_account_errors": float(sum(errors for _, errors, _ in outcomes)),
            "hot_account_checks_passed": float(passed and balance == 0)}


def memory(
    worker: RunningWorker, service: CreditService, operations: int, size: int = 1000
) -> dict[str, float]:
    """Worker resident memory before and after `operations` deducts (sent as batches)."""
    users = [f"mem-{i}" for i in range(100)]
    service.apply_batch([{"op": "add", "user_id": u, "amount": 10**12} for u in users])
    warm = min(operations // 10, 20_000)

    def run(count: int) -> None:
        for start in range(0, count, size * 20):
            handles = [
                worker.client.submit_batch([
                    {"op": "deduct", "user_id": users[i % len(users)], "amount": 1}
                    for i in range(batch, min(batch + size, count))
                ])
                for batch in range(start, min(start + size * 20, count), size)
            ]
            wait_all(handles)

    run(warm)
    before = rss_mib(worker)
    run(operations)
    after = rss_mib(worker)
    return {"memory_ops": float(operations), "worker_rss_mib_before": before,
            "worker_rss_mib_after": after, "worker_rss_growth_ratio": after / before}


# ---------------------------------------------------------------- main


STEPS = ("single", "batch", "batch1000", "mixed_batch", "worker_batch", "reserve", "balance",
         "expiry", "allocation", "hot_account", "memory")


def parse_arguments() -> tuple[argparse.Namespace, dict[str, Any]]:
    """The command line, and the sizes it asks for."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes: under five minutes")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--plot", type=Path, default=BENCH_DIR / "results" / "reserve_latency.png",
                        help="where the reserve latency plot goes")
    parser.add_argument("--only", nargs="*", help=f"run only these: {', '.join(STEPS)}")
    parser.add_argument("--size", nargs="*", default=[], metavar="NAME=N",
                        help="override a size, e.g. lots=100000 "
                        f"(names: {', '.join(SIZES['full'])})")
    args = parser.parse_args()
    sizes: dict[str, Any] = dict(SIZES["quick" if args.quick else "full"])
    for override in args.size:
        name, _, value = override.partition("=")
        if name not in sizes:
            parser.error(f"no size named {name!r}")
        sizes[name] = int(value) if name != "reserve_seconds" else float(value)
    return args, sizes


def main() -> int:
    args, sizes = parse_arguments()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
                   f"Python {platform.python_version()}",
        "taken_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    wanted = set(args.only or STEPS)
    with (
        fresh_database() as database_url,
        tempfile.TemporaryDirectory() as workdir,
        bench_redis(Path(workdir)) as redis_url,
    ):
        engine = make_engine(database_url)
        upgrade(engine)
        service = CreditService(engine)
        needs_worker = bool(wanted & {"single", "worker_batch", "reserve", "memory"})
        worker: Any = start_worker(database_url, redis_url, Path(workdir)) if needs_worker else None
        brokers = {"redis": redis_url}
        if "single" in wanted:
            if rabbitmq_reachable(RABBITMQ):
                brokers["rabbitmq"] = RABBITMQ
            else:
                console.print(f"RabbitMQ at {RABBITMQ} does not answer: the single-operation "
                              "step runs on Redis only")
        try:
            steps: list[tuple[str, Callable[[], dict[str, float]]]] = [
                ("single", lambda: single_operations(worker, service, database_url, Path(workdir),
                                                     brokers, sizes["single"])),
                ("batch", lambda: batches_in_process(database_url, sizes["batch_ops"])),
                ("batch1000",
                 lambda: batches_in_process(database_url, sizes["batch_ops"], size=1000)),
                ("mixed_batch",
                 lambda: batches_in_process(database_url, sizes["batch_ops"], mixed=True)),
                ("hot_account", lambda: hot_account(database_url, sizes["hot_batches"])),
                ("worker_batch",
                 lambda: batches_through_worker(worker, service, sizes["worker_batch_ops"])),
                ("reserve", lambda: reserve_latency(worker, service, sizes["reserve_seconds"],
                                                    plot=args.plot)),
                ("balance", lambda: balance_with_big_ledger(database_url, sizes["ledger"])),
                ("expiry", lambda: expiry(database_url, sizes["lots"])),
                ("allocation", lambda: allocation(database_url, sizes["subscriptions"])),
                ("memory", lambda: memory(worker, service, sizes["memory_ops"])),
            ]
            for name, step in steps:
                if name not in wanted:
                    continue
                console.print(f"[bold]{name}[/bold] ...")
                started = time.perf_counter()
                measured = step()
                figures.update(measured)
                console.print(f"  done in {time.perf_counter() - started:.1f} s: "
                              + ", ".join(f"{key}={value:,.3f}" for key, value in measured.items()))
                if args.json:  # a long run keeps what it measured so far
                    args.json.write_text(json.dumps(figures, indent=2))
        finally:
            if worker is not None:
                worker.stop()
            engine.dispose()
    table = Table(title=f"creditworker benchmarks ({figures['mode']}) on {figures['machine']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in figures.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:,.3f}" if value < 100 else f"{value:,.0f}")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
