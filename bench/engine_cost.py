"""What a metered request costs the engine in process: a reserve and its commit.

    python bench/engine_cost.py [--requests 3000] [--rounds 3] [--profile PATH] [--sides A,B]

The baseline is hand-written SQL doing the same two writes on the same PostgreSQL in the
same run: per request, one transaction that checks `available`, raises `reserved`, inserts
the hold, its ledger entry and its operation row; then one that settles the hold, draws the
lot, lowers `balance` and `reserved`, inserts the commit's entry and its operation row. Each
is one round trip (`BEGIN; ...; COMMIT` in one string over psycopg2), as short as such a
write can be. The engine does the same through `CreditService` (sync, over psycopg2 and over
psycopg 3), `AsyncCreditService` (the sync engine in its thread pool) and, where greenlet and
asyncpg are installed, the greenlet bridge it replaced (bench/greenlet_bridge.py), with
idempotency keys and metadata as the middleware sends
them. Figures per request (reserve + commit): CPU of this Python process
(`time.process_time`), CPU of the PostgreSQL backends serving it (from /proc, the server is
on this machine), and wall time. Rounds alternate so that a noisy neighbour hits all sides.
`--sides` measures some of them only; `CreditService lock then read` (only when named there)
is the sync engine with its lock and its reads in round trips of their own, as before they
shared one (docs/benchmarks.md), for a before/after in the same run.

Needs PostgreSQL (CREDITWORKER_BENCH_POSTGRES_URL, as bench/run.py). Not part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg2
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from bench import greenlet_bridge
from creditworker import AsyncCreditService, CreditService
from creditworker.storage.backends.postgres_arrays import PostgresArrays
from creditworker.storage.migrate import upgrade

POSTGRES = os.environ.get(
    "CREDITWORKER_BENCH_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)
USERS = 100
HELD, CHARGED = 50, 23

RESERVE_SQL = """BEGIN;
WITH a AS (UPDATE accounts SET reserved = reserved + %(n)s, updated_at = now()
           WHERE user_id = %(u)s AND balance - reserved >= %(n)s RETURNING balance, reserved),
h AS (INSERT INTO reservations (id, user_id, amount, status, expires_at, created_at, idempotency_key)
      SELECT %(id)s, %(u)s, %(n)s, 'active', now() + interval '60 seconds', now(), %(key)s FROM a),
e AS (INSERT INTO ledger_entries (user_id, kind, amount, held, balance_after, reserved_after,
                                  reservation_id, description, metadata, idempotency_key, created_at)
      SELECT %(u)s, 'reserve', 0, %(n)s, a.balance, a.reserved, %(id)s, 'POST /api/answer',
             %(meta)s::json, %(key)s, now() FROM a RETURNING id)
INSERT INTO operations (idempotency_key, kind, fingerprint, user_id, result, created_at)
SELECT %(key)s, 'ReserveCredits', %(fp)s, %(u)s, json_build_object('id', %(id)s, 'amount', %(n)s), now()
FROM e;
COMMIT"""

COMMIT_SQL = """BEGIN;
WITH h AS (UPDATE reservations SET status = 'committed', committed_amount = %(c)s, finalized_at = now()
           WHERE id = %(id)s AND status = 'active' RETURNING user_id, amount),
l AS (UPDATE credit_lots SET remaining = remaining - %(c)s WHERE id = %(lot)s AND remaining >= %(c)s),
a AS (UPDATE accounts SET balance = balance - %(c)s, reserved = reserved - h.amount, updated_at = now()
      FROM h WHERE accounts.user_id = h.user_id RETURNING balance, reserved, h.amount),
e AS (INSERT INTO ledger_entries (user_id, kind, amount, held, balance_after, reserved_after,
                                  reservation_id, draws, metadata, idempotency_key, created_at)
      SELECT %(u)s, 'commit', -%(c)s, -a.amount, a.balance, a.reserved, %(id)s,
             json_build_array(json_build_object('lot_id', %(lot)s, 'amount', %(c)s)),
             %(meta)s::json, %(key)s, now() FROM a RETURNING id)
INSERT INTO operations (idempotency_key, kind, fingerprint, user_id, result, created_at)
SELECT %(key)s, 'CommitReservation', %(fp)s, %(u)s, json_build_object('entry_id', e.id), now() FROM e;
COMMIT"""


@contextmanager
def fresh_database() -> Iterator[str]:
    name = f"cw_cost_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    url = make_url(POSTGRES).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


class ServerCpu:
    """CPU seconds used by the PostgreSQL backends connected to one database (same machine)."""

    def __init__(self, url: str) -> None:
        self.database = make_url(url).database
        self.admin = psycopg2.connect(make_url(POSTGRES).set(drivername="postgresql")
                                      .render_as_string(hide_password=False))
        self.admin.autocommit = True
        self.ticks = os.sysconf("SC_CLK_TCK")

    def seconds(self) -> dict[int, float]:
        with self.admin.cursor() as cursor:
            cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.database,))
            pids = [row[0] for row in cursor.fetchall()]
        used = {}
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            used[pid] = (int(fields[11]) + int(fields[12])) / self.ticks
        return used

    def between(self, before: dict[int, float], after: dict[int, float]) -> float:
        return sum(after[pid] - before.get(pid, 0.0) for pid in after)


def measure(name: str, run: Callable[[int], None], count: int, server: ServerCpu) -> dict[str, float]:
    before_server = server.seconds()
    cpu, wall = time.process_time(), time.perf_counter()
    run(count)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    server_cpu = server.between(before_server, server.seconds())
    return {"name": name, "client_cpu_ms": cpu / count * 1000, "server_cpu_ms": server_cpu / count * 1000,
            "wall_ms": wall / count * 1000}


def prepare(url: str) -> None:
    """The schema, and credits for every user in one lot each."""
    sync = CreditService(url)
    upgrade(sync.engine)
    sync.apply_batch([{"op": "add", "user_id": f"user-{index}", "amount": 10**9} for index in range(USERS)])
    sync.engine.dispose()


class Sides:
    """The ways of making a metered request's two writes, each `run(count)`, on a prepared
    database: `sides` always, `optional` when asked for."""

    def __init__(self, url: str) -> None:
        self.sync = sync = CreditService(url)
        self.users = users = [f"user-{index}" for index in range(USERS)]
        with sync.engine.connect() as connection:
            lots = {user: lot for user, lot in connection.execute(text("SELECT user_id, id FROM credit_lots"))}
        self.sync3 = sync3 = CreditService(url.replace("+psycopg2", "+psycopg"))
        self.asynchronous = asynchronous = AsyncCreditService(url)
        self.on_asyncpg = on_asyncpg = greenlet_bridge.GreenletBridge(url) if greenlet_bridge.available() else None
        self.raw = raw = psycopg2.connect(make_url(url).set(drivername="postgresql").render_as_string(hide_password=False))
        raw.autocommit = True
        self.loop = loop = asyncio.new_event_loop()
        counter = iter(range(10**9))

        def metadata() -> dict[str, Any]:
            return {"request_id": uuid.uuid4().hex, "attempt": uuid.uuid4().hex}

        def hand_written(count: int) -> None:
            with raw.cursor() as cursor:
                for _ in range(count):
                    n = next(counter)
                    user = users[n % USERS]
                    hold_id, key = uuid.uuid4().hex, f"mw:{uuid.uuid4().hex}"
                    cursor.execute(RESERVE_SQL, {"n": HELD, "u": user, "id": hold_id, "key": key + ":reserve",
                                                 "meta": json.dumps(metadata()), "fp": key})
                    cursor.execute(COMMIT_SQL, {"c": CHARGED, "id": hold_id, "lot": lots[user], "u": user,
                                                "key": key + ":commit", "fp": key,
                                                "meta": json.dumps({"request_id": key, "response": "json"})})

        def engine_sync(count: int, sync: CreditService = sync) -> None:
            for _ in range(count):
                n = next(counter)
                user, key = users[n % USERS], f"mw:{uuid.uuid4().hex}"
                hold = sync.reserve_credits(user, HELD, ttl_seconds=60, description="POST /api/answer",
                                            metadata=metadata(), idempotency_key=key + ":reserve")
                sync.commit_reservation(hold.id, CHARGED, metadata={"request_id": key, "response": "json"},
                                        idempotency_key=key + ":commit")

        async def engine_async_requests(count: int, asynchronous: Any) -> None:
            for _ in range(count):
                n = next(counter)
                user, key = users[n % USERS], f"mw:{uuid.uuid4().hex}"
                hold = await asynchronous.reserve_credits(
                    user, HELD, ttl_seconds=60, description="POST /api/answer", metadata=metadata(),
                    idempotency_key=key + ":reserve")
                await asynchronous.commit_reservation(
                    hold.id, CHARGED, metadata={"request_id": key, "response": "json"},
                    idempotency_key=key + ":commit")

        def engine_async(count: int) -> None:
            loop.run_until_complete(engine_async_requests(count, asynchronous))

        def engine_sync_lock_then_read(count: int) -> None:
            """The sync engine as before its lock and reads shared a round trip: the backend's
            `lock_and_read` answers None, so a unit of work locks, then reads (3 + 3 round trips)."""
            folded = PostgresArrays.lock_and_read
            PostgresArrays.lock_and_read = lambda *_args, **_kwargs: None  # type: ignore[assignment,method-assign,return-value]
            try:
                engine_sync(count)
            finally:
                PostgresArrays.lock_and_read = folded  # type: ignore[method-assign]

        def four_round_trips(count: int) -> None:
            """The engine's four round trips a request (reserve and commit: the lock with the
            reads, then the writes) with nothing in them: what the round trips alone cost."""
            with raw.cursor() as cursor:
                for _ in range(count * 4):
                    cursor.execute("SELECT 1")
                    cursor.fetchall()

        self.engine_sync = engine_sync
        self.optional: dict[str, Callable[[int], None]] = {
            "CreditService lock then read": engine_sync_lock_then_read, "four round trips": four_round_trips}
        self.sides: dict[str, Callable[[int], None]] = {
            "hand-written SQL": hand_written, "CreditService": engine_sync,
            "CreditService psycopg3": lambda count: engine_sync(count, sync3),
            "AsyncCreditService": engine_async}
        if on_asyncpg is not None:
            self.sides["greenlet bridge, asyncpg"] = lambda count: loop.run_until_complete(
                engine_async_requests(count, on_asyncpg))

    def chosen(self, names: str | None) -> dict[str, Callable[[int], None]]:
        """The sides named (comma-separated), the hand-written SQL always first; all without names."""
        if not names:
            return self.sides
        chosen = {"hand-written SQL", *(name.strip() for name in names.split(","))}
        known = {**self.sides, **self.optional}
        unknown = chosen - set(known)
        if unknown:
            raise SystemExit(f"unknown sides {sorted(unknown)}; known: {list(known)}")
        return {name: run for name, run in known.items() if name in chosen}

    def close(self) -> None:
        self.loop.run_until_complete(self.asynchronous.dispose())
        if self.on_asyncpg is not None:
            self.loop.run_until_complete(self.on_asyncpg.dispose())
        self.sync3.engine.dispose()
        self.loop.close()
        self.raw.close()
        self.sync.engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", help="write a cProfile (CPU time) of the sync engine's requests here")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--sides", help="measure only these sides (comma-separated names as printed;"
                        " the hand-written SQL always runs, as the baseline); 'CreditService lock then"
                        " read' is the sync engine with its lock and its reads in round trips of their"
                        " own, as before they shared one; 'four round trips' is four `SELECT 1` a request")
    options = parser.parse_args()

    with fresh_database() as url:
        prepare(url)
        made = Sides(url)
        server = ServerCpu(url)
        sides = made.chosen(options.sides)
        for run in sides.values():
            run(200)  # warm up: connections, compiled statements
        results: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
        for round_number in range(options.rounds):
            for name, run in sides.items():
                figures = measure(name, run, options.requests, server)
                results[name].append(figures)
                print(f"round {round_number + 1} {name:>20}: client CPU {figures['client_cpu_ms']:.3f} ms, "
                      f"server CPU {figures['server_cpu_ms']:.3f} ms, wall {figures['wall_ms']:.3f} ms "
                      f"per request (reserve + commit)", flush=True)
        print()
        summary = {}
        for name, rounds in results.items():
            summary[name] = {key: statistics.median(r[key] for r in rounds)
                             for key in ("client_cpu_ms", "server_cpu_ms", "wall_ms")}
            s = summary[name]
            print(f"median {name:>20}: client CPU {s['client_cpu_ms']:.3f} ms, server CPU "
                  f"{s['server_cpu_ms']:.3f} ms, wall {s['wall_ms']:.3f} ms")
        base = summary["hand-written SQL"]
        for name in list(sides)[1:]:
            s = summary[name]
            print(f"{name}: client CPU {s['client_cpu_ms'] - base['client_cpu_ms']:+.3f} ms over the baseline's, "
                  f"server CPU x{s['server_cpu_ms'] / base['server_cpu_ms']:.2f}, wall x{s['wall_ms'] / base['wall_ms']:.2f}")
        if options.profile:
            import cProfile

            profiler = cProfile.Profile(time.process_time)  # CPU time: waits on the server are not ours
            profiler.runcall(made.engine_sync, options.requests)
            profiler.dump_stats(options.profile)
            print(f"profile of {options.requests} sync requests: {options.profile}")
        if options.json:
            Path(options.json).write_text(json.dumps({"rounds": results, "median": summary}, indent=2))
        server.admin.close()
        made.close()


if __name__ == "__main__":
    main()
