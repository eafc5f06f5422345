"""The embedded broker: a message a worker took stays on disk, in that worker's folder, until
it is acknowledged; the next worker puts back what a dead one held.

kombu's filesystem transport moves a message's file out of the queue folder and deletes it
as it reads it; from then on the message exists only in the consumer's memory, which kombu
writes back to the queue at a warm shutdown. A worker SIGKILLed (or OOM-killed, or a laptop
losing power) loses every message it held: with gathering on, up to a few hundred
(`tests/faults/test_worker_kills.py` lost 124 of 600 before this module).

Here `_get` renames the file into a folder of the consuming channel's own (`held/<name>/`,
an atomic rename on one filesystem) and deletes it only when the message is acknowledged,
or rejected, or written back. Each such folder has a lock file next to it, locked by its
process for as long as the process lives (a POSIX lock: the kernel drops it when the
process dies, however it dies, and forked children do not inherit it). Every consumer,
when it starts and then every `SWEEP_SECONDS` while it polls, moves the files of every
unlocked folder back to the queue folder under their original names, so they are taken
first. A crash between writing a message back and deleting its held copy delivers it
twice; the idempotency key makes that harmless.

kombu also creates a message's file in the queue folder empty and then writes it, so a
consumer could take it in between and read nothing (a dead letter: seen in a kill test
before this module); here a message is written under a name no consumer looks for and
renamed into place once whole.

Queues consumed without acknowledgements (Celery's remote-control mailboxes) keep kombu's
behaviour, and so does a system without `fcntl` (Windows).
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.transport.virtual import base as virtual
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads
from kombu.utils.objects import cached_property

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None  # type: ignore[assignment]

SWEEP_SECONDS = 5.0
"""How often a polling consumer looks for the folders of dead consumers."""

_OWN_FOLDERS: set[str] = set()
"""This process's held folders: POSIX locks never conflict within one process, so a sweep
tells its own folders by name, not by their lock."""


def restore_orphans(held_root: str, queue_folder: str) -> int:
    """Move back to `queue_folder` the files of every held folder whose lock no process holds."""
    restored = 0
    for name in os.listdir(held_root):
        folder = os.path.join(held_root, name)
        if folder in _OWN_FOLDERS or not os.path.isdir(folder):
            continue
        lock_fd = os.open(f"{folder}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.lockf(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its consumer is alive
            for filename in os.listdir(folder):
                os.rename(os.path.join(folder, filename), os.path.join(queue_folder, filename))
                restored += 1
            os.rmdir(folder)
            os.unlink(f"{folder}.lock")
        finally:
            os.close(lock_fd)
    return restored


class HoldingQoS(virtual.QoS):  # type: ignore[misc]
    """Deletes a message's held file once it is acknowledged or rejected."""

    def ack(self, delivery_tag: str) -> None:
        self.channel._release(delivery_tag)
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        super().reject(delivery_tag, requeue)  # a requeue writes the message back first
        self.channel._release(delivery_tag)


class HoldingChannel(filesystem.Channel):  # type: ignore[misc]
    QoS = HoldingQoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._held: dict[str, str] = {}  # delivery tag -> its file in this channel's folder
        self._unheld_queues: set[str] = set()  # consumed without acknowledgements
        self._holder: tuple[str, int] | None = None  # this channel's folder and lock
        self._swept_at = float("-inf")
        super().__init__(*args, **kwargs)

    @cached_property
    def held_folder(self) -> str:
        folder = self.transport_options.get("held_folder") or os.path.join(
            os.path.dirname(os.path.abspath(self.data_folder_in)), "held"
        )
        os.makedirs(folder, exist_ok=True)
        return str(folder)

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._unheld_queues.add(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        if not no_ack or queue in self._unheld_queues:
            return super().basic_get(queue, no_ack, **kwargs)
        self._unheld_queues.add(queue)
        try:
            return super().basic_get(queue, no_ack, **kwargs)
        finally:
            self._unheld_queues.discard(queue)

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        """kombu's, except that the file appears in the queue folder only once it is whole."""
        filename = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, filename)
        try:
            with open(f"{final}.part", "wb") as file:  # `.part`: not a queue's suffix
                file.write(str_to_bytes(dumps(payload)))
            os.rename(f"{final}.part", final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _get(self, queue: str) -> Any:
        if fcntl is None or queue in self._unheld_queues:
            return super()._get(queue)
        if monotonic() - self._swept_at >= SWEEP_SECONDS:
            self._swept_at = monotonic()
            restore_orphans(self.held_folder, self.data_folder_in)
        wanted = f"{queue}.msg"
        for filename in sorted(os.listdir(self.data_folder_in)):
            if filename.partition(".")[2] != wanted:
                continue
            held = os.path.join(self._folder(), filename)
            try:
                os.rename(os.path.join(self.data_folder_in, filename), held)
            except OSError:
                continue  # another consumer took it first
            return self._read(held)
        raise filesystem.Empty()

    def _read(self, held: str) -> Any:
        with open(held, "rb") as file:
            payload = file.read()
        try:
            message = loads(bytes_to_str(payload))
        except Exception:
            os.unlink(held)  # unreadable: the worker makes a dead letter of it, as before
            raise
        properties = message.get("properties") if isinstance(message, dict) else None
        tag = properties.get("delivery_tag") if isinstance(properties, dict) else None
        if isinstance(tag, str):
            self._held[tag] = held
        else:
            os.unlink(held)  # no tag to acknowledge it by: a dead letter, as before
        return message

    def _folder(self) -> str:
        if self._holder is None:
            folder = os.path.join(self.held_folder, f"{os.getpid()}-{uuid.uuid4().hex}")
            lock_fd = os.open(f"{folder}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.lockf(lock_fd, fcntl.LOCK_EX)  # before the folder exists: a sweep sees it locked
            os.mkdir(folder)
            _OWN_FOLDERS.add(folder)
            self._holder = (folder, lock_fd)
        return self._holder[0]

    def _release(self, delivery_tag: str) -> None:
        held = self._held.pop(delivery_tag, None)
        if held is not None:
            try:
                os.unlink(held)
            except FileNotFoundError:
                pass

    def _restore(self, message: Any) -> None:
        super()._restore(message)
        self._release(message.delivery_tag)

    def close(self) -> None:
        super().close()  # writes back what is unacknowledged
        if self._holder is not None:
            folder, lock_fd = self._holder
            self._holder = None
            for filename in os.listdir(folder):  # taken but never handed over
                os.rename(os.path.join(folder, filename), os.path.join(self.data_folder_in, filename))
            os.rmdir(folder)
            os.unlink(f"{folder}.lock")
            _OWN_FOLDERS.discard(folder)
            os.close(lock_fd)
