"""The Celery internals gathering relies on (creditworker/worker/celery_adapter.py) are still
there, with the signatures and attributes it uses.

These are not Celery's public API. When an upgrade changes one, this test names it; then
adapt celery_adapter.py and move the bound on celery in pyproject.toml.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import celery
import pytest
from billiard.pool import Pool
from celery.worker import state as worker_state
from celery.worker.request import Request, create_request_cls
from celery.worker.strategy import default, hybrid_to_proto2, proto1_to_proto2
from kombu.common import QoS

from creditworker.worker import celery_adapter


def _parameters(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


@pytest.mark.parametrize(("function", "leading", "keywords"), [
    (create_request_cls, ["base", "task", "pool", "hostname", "eventer"], {"app"}),
    (default, ["task", "app", "consumer"], set()),
    (hybrid_to_proto2, ["message", "body"], set()),
    (proto1_to_proto2, ["message", "body"], set()),
    (worker_state.task_reserved, ["request"], set()),
    (worker_state.task_accepted, ["request"], set()),
    (worker_state.task_ready, ["request", "successful"], set()),
    (Request.__init__, ["self", "message", "on_ack", "hostname", "eventer", "app", "connection_errors"],
     {"task", "on_reject", "body", "headers", "decoded", "utc"}),
    (Pool.apply_async, ["self", "func", "args", "kwds", "callback", "error_callback", "accept_callback"], set()),
    (QoS.increment_eventually, ["self", "n"], set()),
    (celery.Task.signature_from_request, ["self", "request", "args", "kwargs", "queue"], set()),
    (QoS.decrement_eventually, ["self", "n"], set()),
])
def test_the_celery_functions_used_keep_their_signatures(function: Any, leading: list[str], keywords: set[str]) -> None:
    names = _parameters(function)
    assert names[: len(leading)] == leading, f"{function.__qualname__}{inspect.signature(function)}"
    assert keywords <= set(names), f"{function.__qualname__} lost {keywords - set(names)}"


@pytest.mark.parametrize("attribute", [
    "_context", "eta", "expires", "revoked", "send_event", "acknowledge", "reject", "request_dict",
    "argsrepr", "kwargsrepr", "root_id", "parent_id", "worker_pid", "id", "name", "args", "kwargs",
])
def test_a_celery_request_has_what_gathering_reads(attribute: str) -> None:
    assert hasattr(Request, attribute) or attribute in getattr(Request, "__slots__", ()), attribute


def test_a_hybrid_message_still_decodes_to_protocol_2() -> None:
    class Message:
        headers: ClassVar[dict[str, Any]] = {}

    (args, kwargs, _embed), headers, decoded, _utc = hybrid_to_proto2(
        Message(), {"task": "t", "id": "i", "args": [], "kwargs": {"a": 1}})
    assert (args, kwargs, headers["task"], headers["id"], decoded) == ([], {"a": 1}, "t", "i", True)


def test_the_log_formats_are_celerys() -> None:
    from celery.app import trace

    assert (celery_adapter.LOG_RECEIVED, celery_adapter.LOG_SUCCESS, celery_adapter.LOG_FAILURE) == (
        trace.LOG_RECEIVED, trace.LOG_SUCCESS, trace.LOG_FAILURE)
    assert "%(name)s" in trace.LOG_SUCCESS and "%(id)s" in trace.LOG_SUCCESS


def test_the_installed_celery_is_within_the_bounds_this_test_passed_on() -> None:
    """pyproject.toml: celery[redis]>=5.4,<5.8. Run this file on a new Celery before moving it."""
    major, minor = (int(part) for part in celery.__version__.split(".")[:2])
    assert (5, 4) <= (major, minor) < (5, 8), celery.__version__


def test_gathering_does_not_import_the_tasks() -> None:
    """gather.py is a strategy over any task with `apply_gathered`: no cycle with tasks.py."""
    import ast
    from pathlib import Path

    from creditworker.worker import gather

    tree = ast.parse(Path(gather.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "creditworker.worker.tasks" not in imported
    assert not {name for name in imported if name and name.startswith("celery.worker")}, imported


def test_what_acknowledge_all_uses_of_kombus_redis_qos_is_there() -> None:
    """celery_adapter.acknowledge_all does what kombu's Redis ack does, for many at once."""
    from kombu.message import Message
    from kombu.transport import redis as kombu_redis
    from kombu.transport.virtual import QoS as VirtualQoS

    assert _parameters(kombu_redis.QoS._remove_from_indices)[:3] == ["self", "delivery_tag", "pipe"]
    assert _parameters(kombu_redis.QoS.pipe_or_acquire)[:2] == ["self", "pipe"]
    assert _parameters(VirtualQoS.ack) == ["self", "delivery_tag"]
    assert "_state" in Message.__slots__
    assert hasattr(Request, "message") and hasattr(Request, "acknowledged")


def test_the_redis_channel_builds_its_client_once(redis_url: str) -> None:
    from kombu import Connection

    from creditworker.worker.transport import GuardedRedisTransport

    with Connection(redis_url, transport=GuardedRedisTransport) as connection:
        channel = connection.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
            assert first.ping()


# ---------------------------------------------------------------- kombu's transports (worker/redis_take.py,
# worker/filesystem_hold.py, worker/transport.py): the internals they override or call


def test_the_installed_kombu_is_within_the_bounds_this_test_passed_on() -> None:
    """pyproject.toml: kombu>=5.7,<5.8. Run this file on a new kombu before moving it."""
    import kombu

    major, minor = (int(part) for part in kombu.__version__.split(".")[:2])
    assert (5, 7) <= (major, minor) < (5, 8), kombu.__version__


@pytest.mark.parametrize(("function", "parameters"), [
    ("redis.Channel._brpop_start", ["self", "timeout"]),
    ("redis.Channel._brpop_read", ["self", "options"]),
    ("redis.Channel._get", ["self", "queue"]),
    ("redis.Channel._q_for_pri", ["self", "queue", "pri"]),
    ("redis.Channel._maybe_update_queues_expire", ["self", "client", "queue"]),
    ("redis.Channel._flush_brpop_reauth", ["self"]),
    ("redis.Channel._get_pool", ["self", "asynchronous"]),
    ("redis.Channel.conn_or_acquire", ["self", "client"]),
    ("redis.QoS.append", ["self", "message", "delivery_tag"]),
    ("redis.QoS.restore_by_tag", ["self", "tag", "client", "leftmost"]),
    ("virtual.QoS.append", ["self", "message", "delivery_tag"]),
    ("virtual.QoS.ack", ["self", "delivery_tag"]),
    ("virtual.QoS.reject", ["self", "delivery_tag", "requeue"]),
    ("virtual.Channel._restore", ["self", "message"]),
    ("virtual.Channel.basic_consume", ["self", "queue", "no_ack", "callback", "consumer_tag", "kwargs"]),
    ("virtual.Channel.basic_get", ["self", "queue", "no_ack", "kwargs"]),
    ("virtual.Transport._deliver", ["self", "message", "queue"]),
    ("filesystem.Channel._get", ["self", "queue"]),
    ("filesystem.Channel._put", ["self", "queue", "payload", "kwargs"]),
])
def test_the_kombu_transport_methods_overridden_keep_their_signatures(function: str, parameters: list[str]) -> None:
    from kombu.transport import filesystem, redis, virtual

    owner, cls, name = function.split(".")
    method = getattr(getattr({"redis": redis, "virtual": virtual, "filesystem": filesystem}[owner], cls), name)
    assert _parameters(method) == parameters, f"{function}{inspect.signature(method)}"


def test_kombus_redis_poller_still_sends_and_reads_through_the_channel() -> None:
    """redis_take replaces BRPOP by overriding the two methods kombu's poller calls."""
    from kombu.transport import redis

    source = inspect.getsource(redis.MultiChannelPoller._register_BRPOP)
    assert "channel._brpop_start()" in source and "channel._in_poll" in source
    assert "self.handlers = {'BRPOP': self._brpop_read" in inspect.getsource(redis.Channel.__init__)
    assert "_brpop_sent_at" in inspect.getsource(redis.MultiChannelPoller.maybe_check_brpop_health)
    assert {"_in_poll", "priority_steps", "unacked_key", "unacked_index_key", "global_keyprefix"} <= set(
        dir(redis.Channel))
    assert "self._queue_cycle = " in inspect.getsource(redis.Channel.__init__)
    assert "self.brpop_timeout = " in inspect.getsource(redis.Channel.__init__)


def test_a_taken_message_is_recorded_exactly_as_kombus_own_qos_records_it(redis_url: str) -> None:
    """The take script writes the unacked hash and index as kombu's `QoS.append` does, and
    kombu's own restore puts the message back from that record."""
    import json

    import redis as redis_py
    from kombu import Connection, Exchange, Queue
    from kombu.transport import redis as kombu_redis

    from creditworker.worker.transport import GuardedRedisTransport
    from tests.e2e.conftest import redis_db

    url = redis_db(redis_url, 10)
    client = redis_py.Redis.from_url(url)
    queue = Queue("pinned", Exchange("pinned"), "pinned")
    records = {}
    for transport in (kombu_redis.Transport, GuardedRedisTransport):
        client.flushdb()
        with Connection(url, transport=transport) as connection:
            channel = connection.channel()
            producer = connection.Producer(channel)
            producer.publish({"n": 1}, exchange=queue.exchange, routing_key="pinned", declare=[queue])
            message = channel.basic_get("pinned")
            tag = message.delivery_tag
            (raw, exchange, routing_key), = [json.loads(value) for value in client.hvals("unacked")]
            assert raw["properties"]["delivery_tag"] == tag and client.zscore("unacked_index", tag)
            records[transport.__name__] = (raw, exchange, routing_key)
            channel.qos.restore_by_tag(tag)
            assert client.llen("pinned") == 1 and not client.hlen("unacked") and not client.zcard("unacked_index")
            channel.close()
    ours, kombus = records["GuardedRedisTransport"], records["Transport"]
    for record in (ours, kombus):
        record[0]["properties"].pop("delivery_tag")
    assert ours == kombus


def test_a_closed_redis_channel_raises_a_connection_error_not_an_attribute_error(redis_url: str) -> None:
    """What stopped the worker after a Redis restart (issue 24): a closed connection's
    channel asked for a client."""
    from kombu import Connection

    from creditworker.worker.transport import GuardedRedisTransport

    connection = Connection(redis_url, transport=GuardedRedisTransport)
    channel = connection.channel()
    connection.collect()
    with pytest.raises(connection.connection_errors), channel.conn_or_acquire():
        pass


@pytest.mark.parametrize("blmove", [True, False], ids=["BLMOVE", "BRPOPLPUSH (Redis < 6.2)"])
def test_an_idle_consumer_gets_messages_on_every_queue_and_priority_and_acks_them(
    redis_url: str, blmove: bool,
) -> None:
    """The take and the non-destructive wait that replace BRPOP (worker/redis_take.py): an idle
    consumer of two queues, waiting on one list, still gets what arrives on the other queue
    and on a priority list; an acknowledged message leaves no unacked record."""
    import socket

    import redis as redis_py
    from kombu import Connection, Exchange, Queue

    from creditworker.worker.transport import GuardedRedisTransport
    from tests.e2e.conftest import redis_db

    url = redis_db(redis_url, 10)
    client = redis_py.Redis.from_url(url)
    client.flushdb()
    exchange = Exchange("idle", type="direct")
    queues = [Queue(name, exchange, routing_key=name) for name in ("first", "second")]
    received: list[int] = []

    def on_message(body: dict[str, int], message: Any) -> None:
        received.append(body["n"])
        message.ack()

    with Connection(url, transport=GuardedRedisTransport) as connection:
        producer = connection.Producer()
        connection.default_channel._blmove = blmove  # the wait command an older server gets
        with connection.Consumer(queues, callbacks=[on_message]):
            with pytest.raises(socket.timeout):
                connection.drain_events(timeout=0.5)  # nothing queued: the consumer waits
            producer.publish({"n": 1}, exchange=exchange, routing_key="second")
            producer.publish({"n": 2}, exchange=exchange, routing_key="first", priority=9)
            while len(received) < 2:
                connection.drain_events(timeout=10)
    assert sorted(received) == [1, 2]
    assert not client.hlen("unacked") and not client.zcard("unacked_index")
