"""Webhook delivery rate against a plain httpx loop posting the same payloads.

    python bench/webhooks.py [--events 10000] [--rounds 2]

Each round: a fresh PostgreSQL database, one endpoint on a local receiver (uvicorn, one
process, answering 204), `--events` events written to the outbox and queued by the relay's
fan-out (timed apart), then `WebhookService.deliver_due()` sending them all: claims with
their lease, Standard Webhooks signatures, the posts (16 threads), every outcome and its
log row written back. The baseline posts the very same bodies in the same run, one after
another with one `httpx.Client` (keep-alive): no database, no signature. The ratio is the
sender's rate over the baseline's. Rounds alternate the order so that a noisy neighbour
hits both sides.

Needs PostgreSQL (CREDITWORKER_BENCH_POSTGRES_URL, as bench/run.py). Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from sqlalchemy import insert, select

from creditworker.contract.events import CreditsLow
from creditworker.contract.webhooks import CreateWebhookEndpoint
from creditworker.notifications.webhooks.service import WebhookOptions, WebhookService
from creditworker.records.outbox import event_row, outbox_table, publish_pending
from creditworker.records.webhooks import deliveries_table, fan_out
from creditworker.storage.database import make_engine
from creditworker.storage.migrate import upgrade
from tests import harness

POSTGRES = os.environ.get(
    "CREDITWORKER_BENCH_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)


async def receiver_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """204 for every POST, after reading the body."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def serve(port: int) -> None:
    import uvicorn

    uvicorn.run(receiver_app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def start_receiver() -> tuple[subprocess.Popen[bytes], str]:
    port = harness.free_port()
    process = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("the receiver never listened") from None
            time.sleep(0.1)
    return process, f"http://127.0.0.1:{port}/hooks"


def queue_events(engine: Any, count: int) -> float:
    """`count` events in the outbox, queued by the relay's fan-out; the fan-out's seconds."""
    at = datetime.now(UTC)
    rows = [event_row(CreditsLow(event_id=str(uuid.uuid4()), occurred_at=at, user_id=f"bench-{n}",
                                 available=5, threshold=10)) for n in range(count)]
    with engine.begin() as connection:
        connection.execute(insert(outbox_table), rows)
    started = time.perf_counter()
    publish_pending(engine, lambda *_args: None, limit=count + 1,
                    also=lambda connection, chunk: fan_out(connection, chunk, datetime.now(UTC)) and None)
    return time.perf_counter() - started


CONCURRENCY = [16]


def run_sender(url: str, count: int) -> tuple[float, list[bytes]]:
    with harness.fresh_database(POSTGRES, prefix="cw_bench_hooks") as database_url:
        engine = make_engine(database_url)
        upgrade(engine)
        hooks = WebhookService(engine, WebhookOptions(allow_private=True, timeout_seconds=5, batch_size=500,
                                                        concurrency=CONCURRENCY[0]))
        hooks.register(CreateWebhookEndpoint(url=url))
        fan_out_seconds = queue_events(engine, count)
        started = time.perf_counter()
        done = hooks.deliver_due()
        seconds = time.perf_counter() - started
        assert done.succeeded == count, done
        with engine.connect() as connection:
            bodies = [json.dumps(payload, separators=(",", ":")).encode()
                      for payload in connection.scalars(select(deliveries_table.c.payload))]
        engine.dispose()
    print(f"  sender: {count} in {seconds:.2f} s ({count / seconds:,.0f}/s); fan-out {fan_out_seconds:.2f} s")
    return seconds, bodies


def run_plain(url: str, bodies: list[bytes]) -> float:
    started = time.perf_counter()
    with httpx.Client(timeout=5) as client:
        for body in bodies:
            client.post(url, content=body, headers={"content-type": "application/json"}).raise_for_status()
    seconds = time.perf_counter() - started
    print(f"  plain httpx loop: {len(bodies)} in {seconds:.2f} s ({len(bodies) / seconds:,.0f}/s)")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16, help="The sender's threads.")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="Write the figures here too.")
    arguments = parser.parse_args()
    if arguments.serve:
        serve(arguments.serve)
        return
    CONCURRENCY[0] = arguments.concurrency
    receiver, url = start_receiver()
    figures: list[dict[str, float]] = []
    try:
        for round_number in range(arguments.rounds):
            print(f"round {round_number + 1}")
            if round_number % 2 == 0:
                sender_seconds, bodies = run_sender(url, arguments.events)
                plain_seconds = run_plain(url, bodies)
            else:
                _seconds, bodies = [], []
                plain_seconds = run_plain(url, _bodies_like(arguments.events))
                sender_seconds, bodies = run_sender(url, arguments.events)
            figures.append({"sender_per_second": arguments.events / sender_seconds,
                            "plain_per_second": arguments.events / plain_seconds,
                            "ratio": plain_seconds / sender_seconds})
    finally:
        receiver.terminate()
        receiver.wait(10)
    for figure in figures:
        print(f"sender {figure['sender_per_second']:,.0f}/s, plain loop {figure['plain_per_second']:,.0f}/s,"
              f" ratio {figure['ratio']:.2f}")
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2))


def _bodies_like(count: int) -> list[bytes]:
    """Bodies the size and shape of the sender's (when the baseline runs first)."""
    at = datetime.now(UTC).isoformat()
    return [json.dumps({"type": "credits.low", "timestamp": at, "data": {
        "event_id": str(uuid.uuid4()), "version": 1, "occurred_at": at, "user_id": f"bench-{n}",
        "type": "credits.low", "available": 5, "threshold": 10, "account": None}},
        separators=(",", ":")).encode() for n in range(count)]


if __name__ == "__main__":
    main()
