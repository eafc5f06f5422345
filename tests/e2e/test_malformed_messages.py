"""Whatever arrives on the queue, the worker keeps running: malformed messages become dead
letters (kept whole, logged once, answered `invalid_input`) and the next message is applied.

Each shape is sent as a raw kombu message (not through Celery's client), on Redis and on
RabbitMQ, for a gathered task (deduct) and one that is not (ping).
"""

from __future__ import annotations

import json
import pickle
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from celery.result import AsyncResult
from kombu import Connection
from sqlalchemy.engine import Engine

from tests.e2e.conftest import RunningWorker, _running, running_on_redis

pytestmark = pytest.mark.e2e

MAX_MESSAGE_BYTES = 65_536
GATHERED, NOT_GATHERED = "creditworker.credits.deduct", "creditworker.health.ping"


@dataclass
class Raw:
    """A message as it is put on the queue."""

    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    content_type: str = "application/json"
    content_encoding: str = "utf-8"

    @property
    def task_id(self) -> str | None:
        task_id = self.headers.get("id")
        return task_id if isinstance(task_id, str) else None


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def malformed(task: str) -> dict[str, Raw]:
    """Every shape a buggy or hostile producer might send for `task`."""
    kwargs = {"user_id": "ann", "amount": 1} if task == GATHERED else {}

    def headers(**extra: Any) -> dict[str, Any]:
        return {"lang": "py", "task": task, "id": str(uuid.uuid4()), **extra}

    return {
        "two-element body": Raw(_json([[], kwargs]), headers()),
        "object body": Raw(_json(kwargs), headers()),
        "kwargs a string": Raw(_json([[], "user_id=ann", None]), headers()),
        "kwargs null": Raw(_json([[], None, None]), headers()),
        "args an object": Raw(_json([{}, kwargs, None]), headers()),
        "embed a string": Raw(_json([[], kwargs, "chain"]), headers()),
        "no id header": Raw(_json([[], kwargs, None]), {"lang": "py", "task": task}),
        "task header a list": Raw(_json([[], kwargs, None]), headers(task=[task])),
        "no headers": Raw(_json([[], kwargs, None]), {}),
        "unknown task": Raw(_json([[], kwargs, None]), headers(task="creditworker.credits.steal")),
        "undecodable bytes": Raw(b"\xff\xfe[[", headers(), content_encoding="binary"),
        "not JSON": Raw(b"[[], {", headers()),
        "pickle": Raw(pickle.dumps(((), kwargs, {})), headers(),
                      content_type="application/x-python-serialize", content_encoding="binary"),
        "plain text": Raw(b"deduct ann 1", headers(), content_type="text/plain"),
        "huge body": Raw(_json([[], {**kwargs, "description": "x" * 2 * MAX_MESSAGE_BYTES}, None]), headers()),
        "timelimit of three": Raw(_json([[], kwargs, None]), headers(timelimit=[1, 2, 3])),
        "eta not a time": Raw(_json([[], kwargs, None]), headers(eta="tomorrow")),
        "retries a string": Raw(_json([[], kwargs, None]), headers(retries="many")),
    }


def publish(worker: RunningWorker, raw: Raw) -> None:
    with Connection(worker.broker_url) as connection:
        connection.Producer().publish(
            raw.body, exchange="", routing_key="celery", headers=raw.headers,
            content_type=raw.content_type, content_encoding=raw.content_encoding,
            correlation_id=raw.task_id, reply_to=worker.client.app.thread_oid,
        )


def dead_letters(worker: RunningWorker) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["creditworker", "dead-letters", "list", "--limit", "1000", "--json"],
        env=worker.env, cwd=worker.workdir, capture_output=True, text=True, check=True,
    )
    letters: list[dict[str, Any]] = json.loads(out.stdout)
    return letters


def wait_for_letters(worker: RunningWorker, count: int, timeout: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while len(letters := dead_letters(worker)) < count and time.monotonic() < deadline:
        time.sleep(0.5)
    return letters


def purge_letters(worker: RunningWorker) -> None:
    subprocess.run(["creditworker", "dead-letters", "purge", "--yes"], env=worker.env,
                   cwd=worker.workdir, capture_output=True, check=True)


@pytest.fixture(scope="module")
def redis_guarded(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, redis_url: str,
    migrated_engines: dict[str, Engine],
) -> Iterator[RunningWorker]:
    yield from running_on_redis(
        tmp_path_factory, postgres_url, redis_url, 3, migrated_engines,
        CREDITWORKER_MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES),
    )


@pytest.fixture(scope="module")
def rabbitmq_guarded(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, rabbitmq_url: str,
    migrated_engines: dict[str, Engine],
) -> Iterator[RunningWorker]:
    yield from _running(
        tmp_path_factory, postgres_url, rabbitmq_url, migrated_engines,
        CREDITWORKER_RESULT_BACKEND="rpc://", CREDITWORKER_MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES),
    )


@pytest.fixture(params=["redis", "rabbitmq"])
def guarded(request: pytest.FixtureRequest) -> RunningWorker:
    from tests.conftest import wipe

    worker: RunningWorker = request.getfixturevalue(f"{request.param}_guarded")
    wipe(worker.engine)
    return worker


@pytest.mark.parametrize("task", [GATHERED, NOT_GATHERED])
def test_malformed_messages_become_dead_letters_and_the_same_worker_goes_on(
    guarded: RunningWorker, task: str
) -> None:
    worker = guarded
    assert worker.process is not None
    pid = worker.process.pid
    worker.service.add_credits("ann", 100)
    assert worker.client.get_user_credits_info("ann").get(timeout=30).total == 100  # reply queue up
    messages = malformed(task)
    for raw in messages.values():
        publish(worker, raw)

    # A well-formed deduct sent after them all is applied, by the same worker process.
    assert worker.client.deduct_credits("ann", 7).get(timeout=30).balance_after == 93
    letters = wait_for_letters(worker, len(messages))
    assert worker.process.poll() is None and worker.process.pid == pid
    assert worker.service.get_user_credits_info("ann").total == 93  # no malformed one applied

    assert len(letters) == len(messages), [letter["reason"] for letter in letters]
    by_task_id = {letter["task_id"]: letter for letter in letters if letter["task_id"]}
    for shape, raw in messages.items():
        if raw.task_id is None:
            continue
        letter = by_task_id[raw.task_id]
        assert letter["reason"] and letter["body_size"] == len(raw.body), shape
        # Its producer learns of it: an invalid_input answer under its task id.
        envelope = AsyncResult(raw.task_id, app=worker.client.app).get(timeout=10)
        assert envelope["ok"] is False and envelope["error"]["code"] == "invalid_input", shape
        assert str(letter["id"]) in json.dumps(envelope["error"]["details"]), shape
        # Logged once, with its task id and why.
        assert worker.log_path.read_text().count(f"message {raw.task_id} ") == 1, shape

    reasons = {shape: by_task_id[raw.task_id]["reason"] for shape, raw in messages.items() if raw.task_id}
    assert "[args, kwargs, embed]" in reasons["two-element body"]
    assert "kwargs are not an object" in reasons["kwargs a string"]
    assert "unknown task" in reasons["unknown task"]
    assert "application/x-python-serialize" in reasons["pickle"]
    assert "bytes, more than" in reasons["huge body"]
    purge_letters(worker)
    assert dead_letters(worker) == []


def test_entries_that_are_not_message_envelopes_become_dead_letters_on_redis(
    redis_guarded: RunningWorker,
) -> None:
    """Bytes pushed onto the Redis list by hand: kombu itself cannot read them."""
    from tests.conftest import wipe

    worker = redis_guarded
    wipe(worker.engine)
    assert worker.process is not None
    pid = worker.process.pid
    worker.service.add_credits("ann", 10)
    entries = [
        b"garbage, not JSON",
        b"\xff\xfe\x00",
        json.dumps({"body": "e30="}).encode(),  # no properties
        json.dumps([1, 2, 3]).encode(),
        json.dumps({"body": "!!!", "properties": {"body_encoding": "base64", "delivery_tag": "t"}}).encode(),
        json.dumps({"body": "e30=", "headers": [], "properties": {
            "delivery_tag": 7, "delivery_info": {"exchange": "", "routing_key": "celery"}}}).encode(),
    ]
    client = redis.Redis.from_url(worker.broker_url)
    for entry in entries:
        client.lpush("celery", entry)
    assert worker.client.deduct_credits("ann", 1).get(timeout=30).balance_after == 9
    letters = wait_for_letters(worker, len(entries))
    assert len(letters) == len(entries)
    assert all("unreadable" in letter["reason"] for letter in letters)
    assert worker.process.poll() is None and worker.process.pid == pid
    assert client.hlen("unacked") == 0  # nothing left waiting for a redelivery

    shown = subprocess.run(
        ["creditworker", "dead-letters", "show", str(letters[-1]["id"])],
        env=worker.env, cwd=worker.workdir, capture_output=True, text=True, check=True,
    )
    assert json.loads(shown.stdout)["body"] == "garbage, not JSON"  # the first one pushed
    purge_letters(worker)


def test_files_that_are_not_message_envelopes_become_dead_letters_on_the_embedded_broker(
    tmp_path_factory: pytest.TempPathFactory, sqlite_url: str, migrated_engines: dict[str, Engine],
) -> None:
    for worker in _running(tmp_path_factory, sqlite_url, "filesystem://", migrated_engines):
        from tests.conftest import wipe

        wipe(worker.engine)
        assert worker.process is not None
        pid = worker.process.pid
        worker.service.add_credits("ann", 10)
        queue = worker.workdir / ".creditworker" / "broker" / "queue"
        (queue / "1_garbage.celery.msg").write_bytes(b"garbage, not JSON")
        (queue / "2_no-properties.celery.msg").write_text(json.dumps({"body": "e30="}))
        assert worker.client.deduct_credits("ann", 1).get(timeout=30).balance_after == 9
        letters = wait_for_letters(worker, 2)
        assert sorted(letter["reason"].split(":")[1].strip() for letter in letters) == [
            "not JSON", "not a kombu message envelope"]
        assert worker.process.poll() is None and worker.process.pid == pid
