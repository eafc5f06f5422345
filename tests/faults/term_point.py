"""The creditworker beat app, stopped on purpose in the middle of a publish.

`celery -A tests.faults.term_point beat ...` runs the usual beat, except that while py-amqp
writes the first frame of beat's first `basic.publish` (its frame buffer's lock held, the
frame not yet on the socket) the process sends itself SIGTERM. Python runs the handler right
there, in the main thread, inside the write: where an operator's SIGTERM lands about once
in many stops (seen once in the test suite), here every time.
"""

from __future__ import annotations

import os
import signal
import struct
import sys
from typing import Any

from amqp import transport

from creditworker.worker.app import default_app

BASIC_PUBLISH = struct.pack(">HH", 60, 40)
"""The method frame's class and method ids of `basic.publish`, after the 7-byte frame header."""

_write = transport._AbstractTransport.write
_sent = False


def _write_or_stop(self: Any, data: bytes) -> None:
    global _sent
    if not _sent and bytes(data[7:11]) == BASIC_PUBLISH:
        _sent = True
        print("term_point: SIGTERM in the middle of a publish", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
    _write(self, data)


transport._AbstractTransport.write = _write_or_stop  # type: ignore[method-assign]

app = default_app()
