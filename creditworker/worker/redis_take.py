"""Redis: a message leaves its queue and enters the unacknowledged set in one atomic step.

kombu's Redis transport takes a message with BRPOP and records it as unacknowledged (the
`unacked` hash and the `unacked_index` zset) in a second round trip, from `QoS.append`. In
between, the message is only in the consumer's socket buffer or memory: a worker killed
there loses it, and nothing anywhere says it existed (issue 24: one deduct in about five
kill runs; `tests/faults/test_worker_kills.py` places the kill there, and run against
kombu's transport it lost that message).
The same window is open for as long as a BRPOP reply waits unread while the consumer has no
prefetch credit.

Here the consumer takes a message with one Lua script (`TAKE`) that pops it from the first
non-empty list, in BRPOP's order, and writes kombu's own unacked records for it, with the
same keys, values and score that `QoS.append` writes. A script runs atomically, so a message
is always either on its queue or in the unacknowledged set, whatever dies when. Everything
after that is kombu's: acks, rejects, the restore sweep (`restore_visible`), the restore at
shutdown, and `redelivery.UnackedHeartbeat`'s re-scoring.

A script cannot block, so an idle consumer waits with a command that takes nothing away:
`BLMOVE q q RIGHT RIGHT` returns when the list `q` has an element and leaves the list as it
was (before Redis 6.2, `BRPOPLPUSH q q` moves that element to the list's other end); the
take that follows gets the message (or finds it taken by another consumer, and waits again). It waits on each consumed queue's
default-priority list in turn, each time for `brpop_timeout / number of queues` seconds; a
message on another list (a priority, another queue) is taken at the latest when that wait
ends, and at once while the consumer is busy.

An entry the script cannot read as a kombu envelope (not JSON, no delivery tag, no exchange
and routing key) is handed over as kombu's BRPOP would and recorded by kombu's own
`QoS.append`; the guarded transport then makes it a dead letter (`transport.py`).
"""

from __future__ import annotations

import logging
from math import ceil
from time import monotonic, time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

logger = logging.getLogger(__name__)

TAKE = """
local index_key, records_key = KEYS[#KEYS - 1], KEYS[#KEYS]
for i = 1, #KEYS - 2 do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, message = pcall(cjson.decode, item)
    if ARGV[i + 1] == '1' and ok and type(message) == 'table' and type(message.properties) == 'table' then
      local tag, route = message.properties.delivery_tag, message.properties.delivery_info
      if type(tag) == 'string' and type(route) == 'table'
          and type(route.exchange) == 'string' and type(route.routing_key) == 'string' then
        redis.call('ZADD', index_key, ARGV[1], tag)
        redis.call('HSET', records_key, tag, '[' .. item .. ', ' .. cjson.encode(route.exchange)
                   .. ', ' .. cjson.encode(route.routing_key) .. ']')
        return {i, item, tag}
      end
    end
    return {i, item}
  end
end
return false
"""
"""KEYS: the lists to take from, in BRPOP's order, then `unacked_index` and `unacked`.
ARGV[1]: the delivery time by the consumer's clock (kombu's scores and sweep use it); then
per list '1' if its messages are acknowledged (recorded), '0' if consumed without acks.
Returns nil, or {list number, entry, delivery tag if recorded}. The unacked value is the
entry's own text inside kombu's `[message, exchange, routing_key]`, never re-encoded."""

ALLOW_OOM = "#!lua flags=allow-oom\n"
"""Redis 7 refuses a script that may write while memory is full (`noeviction`); a take
frees what it records, so it may run (Redis 6 lets a script go on once its first write,
the pop, is done)."""


def server_version(client: Any) -> tuple[int, ...]:
    """(major, minor) of the server; (0,) when it will not say (INFO renamed or refused), which
    chooses the commands every Redis since 2.6 has."""
    try:
        version = str(client.info("server").get("redis_version", "0"))
    except kombu_redis.redis.exceptions.ResponseError:
        return (0,)
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


class TakingQoS(kombu_redis.QoS):  # type: ignore[misc]
    """kombu's Redis QoS, except that a message the take script recorded already is not
    recorded a second time."""

    def append(self, message: Any, delivery_tag: str) -> None:
        taken = self.channel._taken
        if delivery_tag in taken:
            taken.discard(delivery_tag)
            kombu_redis.virtual.QoS.append(self, message, delivery_tag)
            return
        super().append(message, delivery_tag)


class TakingChannel(kombu_redis.Channel):  # type: ignore[misc]
    """kombu's Redis channel, consuming with `TAKE` and a non-destructive wait instead of BRPOP."""

    QoS = TakingQoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._taken: set[str] = set()  # recorded by the script, not yet through QoS.append
        self._no_ack_queues: set[str] = set()  # consumed without acknowledgements: not recorded
        self._next_is_wait = False
        self._wait_turn = 0
        self._paused_until = 0.0
        self._in_flight: tuple[str, list[str]] | None = None
        super().__init__(*args, **kwargs)
        with self.conn_or_acquire() as client:
            version = server_version(client)
        self._take_script = (ALLOW_OOM + TAKE) if version >= (7,) else TAKE
        self._blmove = version >= (6, 2)

    # ------------------------------------------------------------ the consumer's event loop

    def _brpop_start(self, timeout: float | None = None) -> None:
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues or monotonic() < self._paused_until:
            return
        connection = self.client.connection
        if self._next_is_wait:
            queue = queues[self._wait_turn % len(queues)]
            self._wait_turn += 1
            command = self._wait_command(self.global_keyprefix + queue, (timeout or 0) / len(queues))
            self._in_flight = ("wait", queues)
        else:
            command = self._take_command(queues)
            self._in_flight = ("take", queues)
        self._in_poll = connection
        self._brpop_sent_at = monotonic()
        connection.send_command(*command)

    def _brpop_read(self, **options: Any) -> bool:
        kind, queues = self._in_flight or ("take", [])
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "EVAL", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # kombu's: the next poll reconnects
                raise
            except self.ResponseError as exc:
                # A refusal (a read-only replica, a busy script): try again in a second rather
                # than let a channel error stop the worker.
                logger.warning("Redis refused to hand over a message (%r); retrying in 1 s", exc)
                self._paused_until = monotonic() + 1
                raise kombu_redis.Empty() from exc
            if kind == "wait":
                self._next_is_wait = False  # woken or timed out: take next
                raise kombu_redis.Empty()
            if not reply:
                self._next_is_wait = True
                raise kombu_redis.Empty()
            self._deliver_taken(reply, queues)
            return True
        finally:
            self._in_poll = None
            self._in_flight = None
            self._flush_brpop_reauth()

    def _deliver_taken(self, reply: list[Any], queues: list[str]) -> None:
        queue = queues[(int(reply[0]) - 1) % len(queues)]
        self._queue_cycle.rotate(queue)
        self.connection._deliver(self._payload(reply), queue)

    def _payload(self, reply: list[Any]) -> Any:
        """The taken message; its delivery tag noted when the script recorded it. An entry
        the script could read and Python cannot loses its record: the guarded transport
        makes a dead letter of it under a tag of its own."""
        tag = bytes_to_str(reply[2]) if len(reply) > 2 else None
        try:
            payload = loads(bytes_to_str(reply[1]))
        except Exception:
            if tag is not None:
                self.qos._remove_from_indices(tag).execute()
            raise
        if tag is not None:
            self._taken.add(tag)
        return payload

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    # ------------------------------------------------------------ basic_get (no event loop)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        if not no_ack or queue in self._no_ack_queues:
            return super().basic_get(queue, no_ack, **kwargs)
        self._no_ack_queues.add(queue)
        try:
            return super().basic_get(queue, no_ack, **kwargs)
        finally:
            self._no_ack_queues.discard(queue)

    def _get(self, queue: str) -> Any:
        with self.conn_or_acquire() as client:
            # Past the prefixing client: the keys carry the global prefix already.
            reply = kombu_redis.redis.Redis.execute_command(client, *self._take_command([queue]))
            self._maybe_update_queues_expire(client, queue)
        if not reply:
            raise kombu_redis.Empty()
        return self._payload(reply)

    # ------------------------------------------------------------ commands

    def _take_command(self, queues: list[str]) -> tuple[Any, ...]:
        prefix = self.global_keyprefix
        pairs = [(queue, pri) for pri in self.priority_steps for queue in queues]
        keys = [prefix + self._q_for_pri(queue, pri) for queue, pri in pairs]
        keys += [prefix + self.unacked_index_key, prefix + self.unacked_key]
        recorded = ["1" if self.ack_emulation and queue not in self._no_ack_queues else "0" for queue, _ in pairs]
        return ("EVAL", self._take_script, len(keys), *keys, time(), *recorded)

    def _wait_command(self, key: str, timeout: float) -> tuple[Any, ...]:
        if self._blmove:
            return ("BLMOVE", key, key, "RIGHT", "RIGHT", timeout)
        return ("BRPOPLPUSH", key, key, ceil(timeout))  # Redis < 6: whole seconds
