"""What the metering middleware adds to a request: in process, and through the workers.

    python bench/middleware.py [--seconds 20] [--rates 100 200] [--no-worker] [--stream] [--json PATH]

One FastAPI app (an endpoint that answers with its usage) is served by uvicorn in a process
of its own, in turn: without the middleware (the baseline); behind `HandWrittenMetering`,
the least a metering middleware can be (bench/engine_cost.py's hand-written SQL, one round
trip before the endpoint and one after, on psycopg2's own pool and a plain thread pool: what
any implementation on this machine has to pay, measured in the same run); with the product's
middleware in process on PostgreSQL (`AsyncCreditService`, then `CreditService` in the
engine's threads); and with it through the workers (`AsyncCreditClient`, a worker started
like bench/run.py's, on a private Redis). An open-loop client sends requests at a fixed
rate (each one at its scheduled time, whether or not the earlier ones answered, so a slow
server cannot slow the load down) and times each from its scheduled start. The added latency is the percentile with the middleware
minus the same percentile of the baseline, measured in the same run; `cpu ms` is the CPU the
server process used per request (user + system, from /proc), which says whether the machine
had room for the rate at all. With `--stream` the
endpoint answers as OpenAI streams (server-sent events, the usage in the last event) and the
middleware prices it with a rate card; each request is timed until its last byte.

Needs PostgreSQL (CREDITWORKER_BENCH_POSTGRES_URL, as bench/run.py) and, for the worker
path, `redis-server` on PATH. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

USERS = 200
"""Requests are spread over this many users, each with credits for the whole run."""

MODES = ("baseline", "handwritten", "inprocess-async", "inprocess-sync", "worker")
METERED_IN_PROCESS = ("inprocess-async", "inprocess-sync")
"""The product's middleware over an engine in the server's process."""


# ---------------------------------------------------------------- the served app


def create_app() -> Any:
    """The app for `uvicorn --factory`: BENCH_MODE says which middleware, if any."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    from creditworker.http import CreditDeductionMiddleware

    mode = os.environ["BENCH_MODE"]
    database_url = os.environ["BENCH_DATABASE_URL"]
    stream = os.environ.get("BENCH_STREAM") == "1"
    app = FastAPI()
    options: dict[str, Any] = {"path_prefix": "/api"}
    if stream:
        options["rate_card"] = {"gpt-4o-mini": {"prompt_tokens": 150_000, "completion_tokens": 600_000}}

    @app.post("/api/answer")
    async def answer() -> Any:
        if not stream:
            return {"answer": "42", "usage": {"total_tokens": 3}}

        async def events() -> Any:
            for word in ("The", " answer", " is 42"):
                chunk = {"object": "chat.completion.chunk", "model": "gpt-4o-mini", "usage": None,
                         "choices": [{"index": 0, "delta": {"content": word}}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}
            yield f"data: {json.dumps({'model': 'gpt-4o-mini', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    if mode == "handwritten":
        return HandWrittenMetering(app, database_url)
    if mode == "inprocess-async":
        from creditworker import AsyncCreditService

        app.add_middleware(CreditDeductionMiddleware, credit_service=AsyncCreditService(database_url), **options)
    elif mode == "inprocess-sync":
        from creditworker import CreditService

        app.add_middleware(CreditDeductionMiddleware, credit_service=CreditService(database_url), **options)
    elif mode == "worker":
        from creditworker.settings import Settings
        from producers import AsyncCreditClient

        client = AsyncCreditClient(Settings(broker_url=os.environ["BENCH_BROKER_URL"],
                                            data_dir=os.environ["BENCH_DATA_DIR"]))
        app.add_middleware(CreditDeductionMiddleware, client=client, **options)
    return app


class HandWrittenMetering:
    """A metering middleware with nothing in it but the two writes: the reserve of
    bench/engine_cost.py's hand-written SQL before the endpoint (402 when it held nothing),
    the endpoint's JSON body held back and its `usage.total_tokens` read, then the commit's
    SQL and the response with `X-Credits-Deducted`. No validation, idempotency across
    retries, credit types, stale holds, events or streams: a floor under what metering can
    add on this machine, not a product. Each write runs in a `ThreadPoolExecutor` on a
    connection of psycopg2's `ThreadedConnectionPool`, in autocommit mode (the statements
    carry their own BEGIN and COMMIT: one round trip each)."""

    def __init__(self, app: Any, database_url: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import psycopg2.pool
        from engine_cost import COMMIT_SQL, RESERVE_SQL
        from sqlalchemy.engine import make_url

        self.reserve_sql, self.commit_sql = RESERVE_SQL + _HELD_CHECK, COMMIT_SQL
        self.app = app
        dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
        # As many kept as may be open: psycopg2's pool closes a connection handed back beyond
        # its minimum, and a new server process per request is a storm, not a floor.
        self.pool = psycopg2.pool.ThreadedConnectionPool(10, 10, dsn)
        self.threads = ThreadPoolExecutor(10)
        connection = self.pool.getconn()
        connection.autocommit = True
        with connection.cursor() as cursor:  # every bench user has one lot (`grant`)
            cursor.execute("SELECT user_id, id FROM credit_lots")
            self.lots = dict(cursor.fetchall())
        self.pool.putconn(connection)

    def _write(self, statement: str, parameters: dict[str, Any]) -> Any:
        connection = self.pool.getconn()
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(statement, parameters)
                return cursor.fetchone() if cursor.description is not None else None
        finally:
            self.pool.putconn(connection)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        user = headers[b"x-user-id"].decode()
        request_id = headers.get(b"x-request-id", uuid.uuid4().hex.encode()).decode()
        hold_id, key = uuid.uuid4().hex, f"mw:{user}:{request_id}"
        loop = asyncio.get_running_loop()
        held = await loop.run_in_executor(self.threads, self._write, self.reserve_sql, {
            "n": int(headers.get(b"x-estimated-tokens", b"1")), "u": user, "id": hold_id, "key": key + ":reserve",
            "fp": key, "meta": json.dumps({"request_id": request_id, "attempt": uuid.uuid4().hex})})
        if not held[0]:
            await send({"type": "http.response.start", "status": 402, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        start: dict[str, Any] = {}
        body: list[bytes] = []

        async def held_back(message: Any) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            else:
                body.append(message.get("body", b""))

        await self.app(scope, receive, held_back)
        content = b"".join(body)
        charged = json.loads(content)["usage"]["total_tokens"]
        await loop.run_in_executor(self.threads, self._write, self.commit_sql, {
            "c": charged, "id": hold_id, "lot": self.lots[user], "u": user, "key": key + ":commit", "fp": key,
            "meta": json.dumps({"request_id": request_id, "response": "json"})})
        start["headers"] = [*start["headers"], (b"x-credits-deducted", str(charged).encode())]
        await send(start)
        await send({"type": "http.response.body", "body": content})


_HELD_CHECK = ";\nSELECT EXISTS (SELECT 1 FROM reservations WHERE id = %(id)s)"
"""After the reserve's COMMIT, in its round trip: whether it held anything."""


def serve(
    mode: str, database_url: str, workdir: Path, broker_url: str | None,
    *, wrapper: tuple[str, ...] = (), ready_within: float = 60,
) -> tuple[subprocess.Popen[bytes], str]:
    """uvicorn serving the app of `mode` (under `wrapper`, a command such as valgrind's, if
    given), once its port answers."""
    from tests.harness import free_port  # here: the served app (this module) stays lean

    port = free_port()
    here = Path(__file__).resolve()
    env = {**os.environ, "BENCH_MODE": mode, "BENCH_DATABASE_URL": database_url,
           "BENCH_BROKER_URL": broker_url or "", "BENCH_DATA_DIR": str(workdir / ".creditworker"),
           "BENCH_STREAM": os.environ.get("BENCH_STREAM", "0"),
           "PYTHONPATH": os.pathsep.join([str(here.parents[1]), str(here.parent)])}
    with open(workdir / f"{mode}.log", "wb") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "uvicorn", "middleware:create_app", "--factory",
             "--port", str(port), "--log-level", "warning", "--no-access-log"],
            env=env, cwd=Path(__file__).resolve().parent, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_within
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError((workdir / f"{mode}.log").read_text()[-2000:]) from None
            time.sleep(0.05)


# ---------------------------------------------------------------- the load


async def open_loop(url: str, rate: float, seconds: float, warmup: float = 2.0) -> dict[str, Any]:
    """Requests at `rate` per second for `seconds` (after `warmup` seconds not counted)."""
    import httpx

    latencies: list[float] = []
    statuses: dict[int | str, int] = {}
    # Many small pools, not one big one: httpcore assigns pending requests to connections in
    # time quadratic in what one pool has pending, and with hundreds pending the load
    # generator itself fell behind (measured: it used the CPU, the server idled).
    limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
    # The load generator's own garbage collections stalled it for 70-170 ms at a time (its
    # thousands of scheduled requests are its heap), and every request scheduled in that time
    # counted as late: collected before, none during the run.
    gc.collect()
    gc.disable()
    clients = [httpx.AsyncClient(base_url=url, limits=limits, timeout=30) for _ in range(64)]
    try:

        async def one(scheduled: float, index: int, counted: bool) -> None:
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            headers = {"X-User-ID": f"bench-{index % USERS}", "X-Estimated-Tokens": "5",
                       "X-Request-ID": uuid.uuid4().hex}
            client = clients[index % len(clients)]
            try:
                response = await client.post("/api/answer", headers=headers)  # read to its last byte
                status: int | str = response.status_code
            except httpx.HTTPError as exc:  # counted, not fatal: an overloaded server drops some
                status = type(exc).__name__
            if counted:
                latencies.append(time.perf_counter() - scheduled)
                statuses[status] = statuses.get(status, 0) + 1

        start = time.perf_counter() + 0.2
        total = int((warmup + seconds) * rate)
        await asyncio.gather(*[
            one(start + i / rate, i, i >= warmup * rate) for i in range(total)
        ])
    finally:
        gc.enable()
        for client in clients:
            await client.aclose()
    latencies.sort()
    return {
        "requests": len(latencies), "sent": total, "statuses": statuses,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(mode: str, database_url: str, workdir: Path, broker_url: str | None, rate: float,
            seconds: float) -> dict[str, Any]:
    """The latencies of one mode, and the CPU its server process used per request (warm-up
    included: what a request costs the server, whatever the machine's speed)."""
    process, url = serve(mode, database_url, workdir, broker_url)
    try:
        before = cpu_seconds(process.pid)
        figures = asyncio.run(open_loop(url, rate, seconds))
        figures["server_cpu_ms"] = 1000 * (cpu_seconds(process.pid) - before) / figures["sent"]
        return figures
    finally:
        process.terminate()
        process.wait(30)


def grant(database_url: str) -> None:
    """Credits for every user, then a history (20,000 deducts, 2,000 held and committed
    requests) and `VACUUM ANALYZE`, so that no mode measures a database's first rows.

    Without it the first metered mode of a run added 64-80 ms at p99 (at 200 requests/s,
    four runs) where it adds 6-7 ms on a database with a history: what a new database's
    first thousands of rows cost (the cause was not isolated further), not what a metered
    request costs."""
    from sqlalchemy import create_engine, text

    from creditworker import CreditService

    service = CreditService(database_url, create_tables=True)
    service.apply_batch([{"op": "add", "user_id": f"bench-{i}", "amount": 10_000_000} for i in range(USERS)])
    for batch in range(20):
        service.apply_batch([{"op": "deduct", "user_id": f"bench-{i % USERS}", "amount": 1,
                              "idempotency_key": f"history-{batch}-{i}"} for i in range(1000)])
    for i in range(2000):
        hold = service.reserve_credits(f"bench-{i % USERS}", 5, idempotency_key=f"history-hold-{i}")
        service.commit_reservation(hold.id, 3, idempotency_key=f"history-commit-{i}")
    service.engine.dispose()
    admin = create_engine(database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text("VACUUM ANALYZE"))
    admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rates", type=float, nargs="+", default=[100, 200])
    parser.add_argument("--no-worker", action="store_true", help="skip the worker path")
    parser.add_argument("--stream", action="store_true", help="a streamed endpoint priced by a rate card")
    parser.add_argument("--modes", nargs="+", choices=MODES[1:], help="only these metered modes")
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    if arguments.stream:
        os.environ["BENCH_STREAM"] = "1"

    from run import bench_redis, fresh_database, start_worker

    results: dict[str, Any] = {"cpus": os.cpu_count(), "seconds": arguments.seconds, "stream": arguments.stream,
                               "load_average_before": os.getloadavg(), "rates": {}}
    with tempfile.TemporaryDirectory() as directory, fresh_database() as database_url:
        workdir = Path(directory)
        grant(database_url)
        modes = [m for m in MODES if (m != "worker" or not arguments.no_worker)
                 and (m == "baseline" or not arguments.modes or m in arguments.modes)]
        broker_url = worker = None
        with bench_redis(workdir) if "worker" in modes else _nothing() as redis_url:
            if redis_url is not None:
                broker_url = redis_url
                worker = start_worker(database_url, broker_url, workdir)
            try:
                for rate in arguments.rates:
                    by_mode = {
                        mode: measure(mode, database_url, workdir, broker_url, rate,
                                      arguments.seconds)
                        for mode in modes
                    }
                    base = by_mode["baseline"]
                    for mode, figures in by_mode.items():
                        if mode != "baseline":
                            figures["added_p50_ms"] = figures["p50_ms"] - base["p50_ms"]
                            figures["added_p99_ms"] = figures["p99_ms"] - base["p99_ms"]
                    results["rates"][str(int(rate))] = by_mode
                    print(json.dumps({"rate": rate, **by_mode}, indent=1), flush=True)
            finally:
                if worker is not None:
                    worker.stop()
    _table(results)
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=2))


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_exc: object) -> None:
        return None


def _table(results: dict[str, Any]) -> None:
    print(f"\n{'rate/s':>6} {'mode':<16} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} "
          f"{'+p99 ms':>8} {'cpu ms':>7}  statuses")
    for rate, by_mode in results["rates"].items():
        for mode, figures in by_mode.items():
            print(f"{rate:>6} {mode:<16} {figures['p50_ms']:>8.2f} {figures['p99_ms']:>8.2f} "
                  f"{figures.get('added_p50_ms', 0):>8.2f} "
                  f"{figures.get('added_p99_ms', 0):>8.2f} {figures['server_cpu_ms']:>7.2f}  {figures['statuses']}")


if __name__ == "__main__":
    main()
